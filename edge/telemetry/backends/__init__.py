"""Telemetry backends, one module each; `detect.detect_backend` picks the best available."""

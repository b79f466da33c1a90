"""jetfed: federated fine-tuning on Jetson devices over MQTT, with energy and time profiles."""

__version__ = "0.1.0"

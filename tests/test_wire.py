"""The wire format: codec round trips, digests, manifests, message validation, size limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from jetfed.edge.errors import ProtocolError
from jetfed.edge.tensor_codec import decode_tensors, encode_tensors, tensor_spec
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import BlobServer, Download, TransferTimeout
from jetfed.edge.wire import (
    BlobManifest,
    Hello,
    PayloadTooLarge,
    Update,
    check_publish_size,
    encode_message,
    make_manifest,
    mqtt_publish_wire_bytes,
    parse_message,
    sha256_hex,
)


def sample_tensors() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A": torch.randn(8, 384, generator=generator),
        "layer.lora_B": torch.randn(384, 8, generator=generator),
        "classifier.weight": torch.randn(2, 384, generator=generator),
    }


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_codec_round_trip(dtype: str, tolerance: float) -> None:
    tensors = sample_tensors()
    data = encode_tensors(tensors, dtype)
    decoded = decode_tensors(data, tensor_spec(tensors))
    assert set(decoded) == set(tensors)
    for name, value in tensors.items():
        assert decoded[name].dtype == torch.float32
        assert torch.allclose(decoded[name], value, rtol=tolerance, atol=tolerance)
    raw_bytes = sum(t.numel() for t in tensors.values()) * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    assert raw_bytes < len(data) < raw_bytes + 512  # header only


def test_decode_refuses_wrong_names_shapes_dtypes_and_non_finite() -> None:
    tensors = sample_tensors()
    spec = tensor_spec(tensors)
    renamed = dict(tensors)
    renamed["other"] = renamed.pop("classifier.weight")
    with pytest.raises(ProtocolError, match="names differ"):
        decode_tensors(encode_tensors(renamed), spec)
    reshaped = dict(tensors, **{"classifier.weight": torch.zeros(3, 384)})
    with pytest.raises(ProtocolError, match="shape"):
        decode_tensors(encode_tensors(reshaped), spec)
    for bad in (float("nan"), float("inf")):
        poisoned = dict(tensors)
        poisoned["layer.lora_A"] = poisoned["layer.lora_A"].clone()
        poisoned["layer.lora_A"][0, 0] = bad
        with pytest.raises(ProtocolError, match="NaN or Inf"):
            decode_tensors(encode_tensors(poisoned), spec)
    from safetensors.torch import save

    as_int = save({name: t.to(torch.int32) for name, t in tensors.items()})
    with pytest.raises(ProtocolError, match="dtype"):
        decode_tensors(as_int, spec)
    with pytest.raises(ProtocolError, match="safetensors"):
        decode_tensors(b"\x00" * 64, spec)
    with pytest.raises(ProtocolError, match="safetensors"):
        decode_tensors(encode_tensors(tensors)[:-100], spec)


def test_manifest_chunks_and_digest_checks() -> None:
    data = bytes(range(256)) * 1000
    manifest = make_manifest(data, chunk_size_bytes=10_000)
    assert manifest.chunk_count == math.ceil(len(data) / 10_000)
    chunk_digests = [sha256_hex(data[i : i + 10_000]) for i in range(0, len(data), 10_000)]
    assert manifest.chunk_digests == chunk_digests
    assert manifest.digest == sha256_hex(b"".join(bytes.fromhex(d) for d in chunk_digests))
    published: list = []
    server = BlobServer(lambda topic, payload: published.append((topic, payload)), 10_000)
    server.offer(data, 10_000)
    requests: list = []
    download = Download(manifest, requests.append, max_size_bytes=len(data))
    download.start()
    assert requests == [list(range(manifest.chunk_count))]
    server.serve(manifest.digest, requests[0], lambda digest, index: f"t/{index}")
    corrupted = bytearray(published[3][1])
    corrupted[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="digest mismatch"):
        download.add_chunk(3, bytes(corrupted))
    with pytest.raises(ProtocolError, match="bytes"):
        download.add_chunk(4, published[4][1][:-1])
    with pytest.raises(ProtocolError, match="out of range"):
        download.add_chunk(manifest.chunk_count, b"x")
    for topic, payload in published:
        download.add_chunk(int(topic.split("/")[1]), payload)
    assert download.add_chunk(0, published[0][1]) is False  # a duplicate is ignored
    assert download.duplicate_chunks == 1
    assert download.result() == data


def test_download_refuses_oversized_manifest_and_times_out() -> None:
    manifest = make_manifest(b"x" * 5000, chunk_size_bytes=1000)
    with pytest.raises(ProtocolError, match="exceeds"):
        Download(manifest, lambda indices: None, max_size_bytes=4000)
    requests: list = []
    download = Download(manifest, requests.append, 10_000, retry_after_s=0.0, timeout_s=0.05)
    download.start()
    download.poll()
    assert len(requests) == 2  # re-asked for the missing chunks after the stall
    import time

    time.sleep(0.1)
    with pytest.raises(TransferTimeout):
        download.poll()


def test_manifest_digest_is_over_the_chunk_digests_and_checked_on_parse() -> None:
    """Version 2: the digest is the sha256 of the chunk digests, so verifying every chunk
    verifies the whole; a manifest whose digest is anything else (a lie, or version 1's sha256
    of the payload) is refused when parsed, before a byte is asked for."""
    data = b"z" * 2500
    good = make_manifest(data, 1000).model_dump()
    assert parse_message(BlobManifest, json.dumps(good).encode()).digest == good["digest"]
    lying = {**good, "digest": sha256_hex(data)}  # the whole-payload digest of version 1
    with pytest.raises(ProtocolError, match="digest is not the sha256 of the chunk digests"):
        parse_message(BlobManifest, json.dumps(lying).encode())
    swapped = {**good, "chunk_digests": good["chunk_digests"][::-1]}  # order is part of it
    with pytest.raises(ProtocolError, match="digest is not the sha256 of the chunk digests"):
        parse_message(BlobManifest, json.dumps(swapped).encode())


@pytest.mark.parametrize("version", [None, 1, 3])
def test_manifest_of_another_version_is_one_line_naming_it(version: object) -> None:
    """An older peer (no `version`: whole-payload digest) or a newer one is refused with one
    line that says what to do, inside whatever message carries the manifest."""
    manifest = make_manifest(b"q" * 10, 1000).model_dump()
    if version is None:
        del manifest["version"]
    else:
        manifest["version"] = version
    update = {
        "experiment": "e",
        "device_id": "dev-0",
        "round_index": 0,
        "base_digest": "0" * 64,
        "num_samples": 1,
        "local_steps": 1,
        "train_loss": 0.5,
        "blob": manifest,
    }
    with pytest.raises(ProtocolError) as refused:
        parse_message(Update, json.dumps(update).encode())
    line = str(refused.value)
    assert "\n" not in line
    assert f"blob manifest version {version or 1} from another jetfed" in line
    assert "run the same jetfed on the coordinator and every device" in line


def test_manifest_that_lies_about_its_size_is_refused() -> None:
    good = make_manifest(b"y" * 3000, 1000).model_dump()
    good["size_bytes"] = 10_000
    with pytest.raises(ProtocolError, match="chunk_digests"):
        parse_message(BlobManifest, json.dumps(good).encode())


def hello_dict() -> dict:
    return {
        "device_id": "orin-01",
        "jetfed_version": "0.1.0",
        "hostname": "orin",
        "machine": "aarch64",
        "accelerator": "cuda",
        "memory_total_bytes": 64 << 30,
    }


def test_parse_message_rejects_malformed_wrong_schema_and_oversized() -> None:
    assert parse_message(Hello, json.dumps(hello_dict()).encode()).device_id == "orin-01"
    with pytest.raises(ProtocolError, match="invalid Hello"):
        parse_message(Hello, b"{not json")
    with pytest.raises(ProtocolError, match="admin: unknown field"):
        parse_message(Hello, json.dumps(dict(hello_dict(), admin=True)).encode())
    with pytest.raises(ProtocolError, match="memory_total_bytes"):
        parse_message(Hello, json.dumps(dict(hello_dict(), memory_total_bytes="64G")).encode())
    with pytest.raises(ProtocolError, match="device_id"):
        parse_message(Hello, json.dumps(dict(hello_dict(), device_id="a/../b")).encode())
    with pytest.raises(ProtocolError, match="bytes"):
        parse_message(Hello, b" " * 5000, max_bytes=4096)


def test_update_loss_must_be_finite() -> None:
    update = {
        "experiment": "e",
        "device_id": "d",
        "round_index": 0,
        "base_digest": "0" * 64,
        "num_samples": 10,
        "local_steps": 1,
        "train_loss": 0.5,
        "blob": make_manifest(b"abc", 1024).model_dump(),
    }
    assert parse_message(Update, json.dumps(update).encode()).num_samples == 10
    with pytest.raises(ProtocolError):
        parse_message(Update, json.dumps(dict(update, train_loss=float("nan"))).encode())
    with pytest.raises(ProtocolError):
        parse_message(Update, json.dumps(dict(update, num_samples=0)).encode())


def test_topics_and_size_limits() -> None:
    topics = Topics("exp")
    assert topics.task == "jetfed/exp/task"
    assert topics.chunk("orin-01", "up", "ab", 3) == "jetfed/exp/devices/orin-01/up/ab/3"
    assert topics.parse_device_topic("jetfed/exp/devices/orin-01/up/ab/3") == (
        "orin-01",
        "up",
        ["ab", "3"],
    )
    with pytest.raises(ProtocolError):
        topics.parse_device_topic("jetfed/other/devices/x/hello")
    check_publish_size("t", 100, 100)
    with pytest.raises(PayloadTooLarge, match="max_message_bytes"):
        check_publish_size("t", 101, 100)
    assert mqtt_publish_wire_bytes("a/b", 10) == 1 + 1 + 2 + 3 + 2 + 10
    assert mqtt_publish_wire_bytes("t", 300_000) == 300_000 + 1 + 2 + 1 + 2 + 3
    assert encode_message(parse_message(Hello, json.dumps(hello_dict()).encode()))

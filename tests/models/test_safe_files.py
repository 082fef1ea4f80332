"""Tests for models.adapters.safe_files: hostile weight files are refused before anything runs."""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.adapters.safe_files import (
    SafetensorsHeader,
    TensorInfo,
    load_pickle_object,
    load_state_dict,
    read_safetensors_header,
    sniff_format,
)
from storage.errors import InvalidRequestError

MB = 2**20
CODE_SENTENCE = "This file contains code, not just weights"


def _write_raw(path: Path, header: object, data: bytes) -> Path:
    """Write a safetensors-shaped file by hand: u64 little-endian length, JSON header, data."""
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _write_marker(path: str) -> None:
    """The 'payload' of the malicious pickles: harmless, but proves code ran if the marker appears."""
    Path(path).write_text("pwned")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_write_marker, (str(self.marker),))


def _assert_refused(path: Path, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        read_safetensors_header(path)
    message = str(info.value)
    assert fragment in message
    assert str(path.parent) not in message and path.name not in message


def test_valid_file_round_trips(tmp_path: Path) -> None:
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, 2, 3], dtype=torch.int64),
        "c": torch.ones(4, dtype=torch.float16),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})

    header = read_safetensors_header(path)
    assert isinstance(header, SafetensorsHeader)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == {"a", "b", "c"}
    assert header.tensors["a"].dtype == "F32" and header.tensors["a"].shape == (2, 3)
    assert header.tensors["a"].end - header.tensors["a"].begin == 24
    begin_b = header.tensors["b"].begin
    assert header.tensors["b"] == TensorInfo("I64", (3,), begin_b, begin_b + 24)
    # The length prefix says how long the header is: check it against the file independently.
    assert header.header_bytes == int.from_bytes(path.read_bytes()[:8], "little")

    assert sniff_format(path) == "safetensors"
    loaded = load_state_dict(path, max_bytes=MB)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


def test_hand_written_valid_header_is_accepted(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"k": "v"},
        "x": {"dtype": "U8", "shape": [2, 2], "data_offsets": [0, 4]},
        "y": {"dtype": "BF16", "shape": [1], "data_offsets": [4, 6]},
    }
    path = _write_raw(tmp_path / "w.safetensors", header, bytes(6))
    parsed = read_safetensors_header(path)
    assert parsed.tensors == {"x": TensorInfo("U8", (2, 2), 0, 4), "y": TensorInfo("BF16", (1,), 4, 6)}
    assert parsed.metadata == {"k": "v"}


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 500) + b'{"a": 1}')
    _assert_refused(path, "past the end of the file")


def test_huge_claimed_header(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 100 * MB) + b"{}" + bytes(64))
    _assert_refused(path, "header is larger than allowed")


def test_header_not_json(tmp_path: Path) -> None:
    _assert_refused(_write_raw(tmp_path / "a.safetensors", b"{not json at all", b""), "not readable JSON")
    _assert_refused(_write_raw(tmp_path / "b.safetensors", b"\xff\xfe{}", b""), "not readable JSON")
    _assert_refused(_write_raw(tmp_path / "c.safetensors", [1, 2], b""), "not a JSON object")


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _assert_refused(_write_raw(tmp_path / "w.safetensors", header, bytes(12)), "share the same bytes")


def test_out_of_range_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    _assert_refused(_write_raw(tmp_path / "a.safetensors", header, bytes(8)), "outside the file")
    header = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [-4, 0]}}
    _assert_refused(_write_raw(tmp_path / "b.safetensors", header, bytes(8)), "outside the file")


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}
    _assert_refused(_write_raw(tmp_path / "w.safetensors", header, bytes(1)), "unsupported data type")


def test_size_mismatch(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    _assert_refused(_write_raw(tmp_path / "w.safetensors", header, bytes(8)), "does not match its shape")


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"dtype": "F32", "shape": [1]}, "exactly a dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, "non-negative"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "non-negative"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "pair of whole numbers"),
    ],
)
def test_malformed_entries(tmp_path: Path, entry: dict[str, object], fragment: str) -> None:
    _assert_refused(_write_raw(tmp_path / "w.safetensors", {"a": entry}, bytes(4)), fragment)


def test_bad_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": {"k": 1}}
    _assert_refused(_write_raw(tmp_path / "w.safetensors", header, b""), "metadata")


def test_nan_tensor_refused(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    save_file({"a": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}, str(path))
    with pytest.raises(InvalidRequestError, match="NaN or infinite"):
        load_state_dict(path, max_bytes=MB)
    path_inf = tmp_path / "inf.safetensors"
    save_file({"a": torch.tensor([float("-inf")], dtype=torch.bfloat16)}, str(path_inf))
    with pytest.raises(InvalidRequestError, match="NaN or infinite"):
        load_state_dict(path_inf, max_bytes=MB)


def test_marker_payload_really_runs_under_plain_pickle(tmp_path: Path) -> None:
    """Control: without the restricted loader the payload does execute, so the tests below mean something."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


# torch's restricted unpickler warns on protocols other than 2; a hostile file may use any of them.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_raw_pickle_named_safetensors(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "lora.safetensors"
    path.write_bytes(pickle.dumps({"w": _Evil(marker)}, protocol=protocol))
    assert sniff_format(path) == "pickle"
    with pytest.raises(InvalidRequestError, match=CODE_SENTENCE) as info:
        load_state_dict(path, max_bytes=MB)
    assert not marker.exists()
    assert str(tmp_path) not in str(info.value)


def test_malicious_torch_zip_pickle_as_pt(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "lora.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, path)
    assert not marker.exists()
    assert sniff_format(path) == "pickle-zip"
    with pytest.raises(InvalidRequestError, match=CODE_SENTENCE):
        load_state_dict(path, max_bytes=MB)
    assert not marker.exists()


def test_benign_torch_save_loads(tmp_path: Path) -> None:
    weights = {"lora.down": torch.randn(4, 2), "lora.up": torch.randn(2, 4)}
    plain = tmp_path / "plain.pt"
    torch.save(weights, plain)
    loaded = load_state_dict(plain, max_bytes=MB)
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)

    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": weights, "epoch": 3}, wrapped)
    loaded = load_state_dict(wrapped, max_bytes=MB)
    assert set(loaded) == set(weights) and torch.equal(loaded["lora.up"], weights["lora.up"])


def test_pickle_without_tensors_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(InvalidRequestError, match="plain set of named weights"):
        load_state_dict(path, max_bytes=MB)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert sniff_format(path) == "unknown"
    with pytest.raises(InvalidRequestError, match="not a weights file we can read"):
        load_state_dict(path, max_bytes=MB)
    _assert_refused(path, "too short")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    data = bytearray(os.urandom(4096))
    data[0] = 0x13  # keep the random bytes from looking like a pickle or zip by chance
    data[8] = ord("x")
    path.write_bytes(bytes(data))
    assert sniff_format(path) == "unknown"
    with pytest.raises(InvalidRequestError, match="not a weights file we can read"):
        load_state_dict(path, max_bytes=MB)


def test_size_cap_checked_first(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"a": torch.zeros(300_000)}, str(path))  # ~1.2 MB, a valid file
    assert path.stat().st_size > MB
    with pytest.raises(InvalidRequestError, match=r"larger than the 1 MB limit") as info:
        load_state_dict(path, max_bytes=MB)
    assert str(tmp_path) not in str(info.value)
    assert len(load_state_dict(path, max_bytes=2 * MB)["a"]) == 300_000


def test_pickle_object_keeps_nested_plain_data(tmp_path: Path) -> None:
    """Hypernetwork-shaped data: int keys, lists of state dicts, text and flags survive weights_only."""
    obj = {768: [{"linear.0.weight": torch.ones(2, 2)}, {"linear.0.weight": torch.zeros(2, 2)}]}
    obj |= {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False}
    path = tmp_path / "hn.pt"
    torch.save(obj, path)
    loaded = load_pickle_object(path, max_bytes=MB)
    assert loaded["layer_structure"] == [1, 2, 1] and loaded["activation_func"] == "relu"
    assert torch.equal(loaded[768][0]["linear.0.weight"], torch.ones(2, 2))


def test_pickle_object_refuses_code_and_nan(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "hn.pt"
    torch.save({768: [_Evil(marker)]}, evil)
    with pytest.raises(InvalidRequestError, match=CODE_SENTENCE):
        load_pickle_object(evil, max_bytes=MB)
    assert not marker.exists()
    nan = tmp_path / "nan.pt"
    torch.save({768: [{"w": torch.tensor([float("nan")])}]}, nan)
    with pytest.raises(InvalidRequestError, match="NaN or infinite"):
        load_pickle_object(nan, max_bytes=MB)
    safetensors_file = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(safetensors_file))
    with pytest.raises(InvalidRequestError, match="not a torch-saved file"):
        load_pickle_object(safetensors_file, max_bytes=MB)


def _zip_bomb(path: Path, unpacked_mb: int) -> None:
    """A torch-zip-shaped archive whose one deflated member unpacks to ``unpacked_mb`` MB of zeros."""
    torch.save({"w": torch.zeros(1)}, path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/bomb", "w", force_zip64=True) as member:
            block = bytes(MB)
            for _ in range(unpacked_mb):
                member.write(block)


@pytest.mark.parametrize("loader", [load_state_dict, load_pickle_object])
def test_zip_bomb_refused_without_unpacking(tmp_path: Path, loader: object) -> None:
    path = tmp_path / "bomb.pt"
    _zip_bomb(path, 300)
    assert path.stat().st_size < 2 * MB  # small on disk, 300 MB unpacked
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidRequestError, match="zip bomb"):
        loader(path, max_bytes=10 * MB)  # type: ignore[operator]
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100 * 1024  # the bomb was never unpacked into memory

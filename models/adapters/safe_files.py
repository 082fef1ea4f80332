"""Read untrusted weight files safely: validate safetensors headers first, never run pickled code.

Adapters come from strangers, so every file is treated as hostile. The format is sniffed from the first
bytes (never from the extension); a safetensors header is parsed and checked in full before a single
tensor is read; pickles are opened only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from storage.errors import InvalidRequestError

__all__ = [
    "FileFormat",
    "SafetensorsHeader",
    "TensorInfo",
    "load_pickle_object",
    "load_state_dict",
    "read_safetensors_header",
    "sniff_format",
]

log = logging.getLogger(__name__)

FileFormat = Literal["safetensors", "pickle-zip", "pickle", "unknown"]

#: Bytes per element of each safetensors dtype we accept.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

#: Largest number of dimensions and size of one dimension in a tensor we read.
_MAX_DIMS = 8
_MAX_SIZE = 2**31 - 1
_NATIVE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CODE_MESSAGE = "This file contains code, not just weights; upload a .safetensors file instead."
#: A torch zip may unpack to at most this many times its size (plus the slack) before it counts as a bomb.
_ZIP_MAX_RATIO = 4
_ZIP_SLACK = 2**20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``begin``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Attributes:
        tensors: Tensor name to its entry.
        metadata: The free-form ``__metadata__`` strings.
        header_bytes: Length of the JSON header (without the 8-byte length prefix).
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int


def _refuse(reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"This weights file is not a valid safetensors file: {reason}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_metadata(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise _refuse("its metadata must map text to text")
    return dict(raw)


def _sane_shape(shape: list[int]) -> bool:
    """At most 8 sizes of at most 2**31 - 1, whose non-zero product torch can stride over."""
    return (
        len(shape) <= _MAX_DIMS
        and all(d <= _MAX_SIZE for d in shape)
        and math.prod(max(d, 1) for d in shape) < 2**62
    )


def _parse_entry(raw: object, data_len: int) -> TensorInfo:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _refuse("a tensor entry does not have exactly a dtype, a shape and data offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _refuse("a tensor has an unsupported data type")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _refuse("a tensor shape is not a list of non-negative whole numbers")
    if not _sane_shape(shape):  # a tensor of 0 elements passes the size check whatever its other sizes
        raise _refuse("a tensor shape has too many or too large sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _refuse("a tensor's data offsets are not a pair of whole numbers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _refuse("a tensor's data lies outside the file")
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _refuse("a tensor's byte size does not match its shape and data type")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_no_overlap(tensors: dict[str, TensorInfo]) -> None:
    previous_end = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < previous_end:
            raise _refuse("two tensors share the same bytes")
        previous_end = max(previous_end, info.end)


def _read_header_json(path: Path, max_header_bytes: int) -> tuple[object, int, int]:
    """Return (decoded JSON, header length, data section length) after the size checks."""
    file_size = path.stat().st_size
    if file_size < 8:
        raise _refuse("it is too short to hold a header")
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len > max_header_bytes:
            raise _refuse("its header is larger than allowed")
        if header_len > file_size - 8:
            raise _refuse("its header runs past the end of the file")
        raw = fh.read(header_len)
    try:
        decoded: object = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _refuse("its header is not readable JSON") from None
    return decoded, header_len, file_size - 8 - header_len


def read_safetensors_header(path: Path, *, max_header_bytes: int = 16 * 2**20) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data.

    Args:
        path: The file to read.
        max_header_bytes: Largest JSON header accepted.

    Returns:
        The validated header.

    Raises:
        InvalidRequestError: The file is not a well-formed safetensors file we accept.
    """
    decoded, header_len, data_len = _read_header_json(path, max_header_bytes)
    if not isinstance(decoded, dict):
        raise _refuse("its header is not a JSON object")
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, raw in decoded.items():
        if name == "__metadata__":
            metadata = _parse_metadata(raw)
        else:
            tensors[name] = _parse_entry(raw, data_len)
    _check_no_overlap(tensors)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, header_bytes=header_len)


def sniff_format(path: Path) -> FileFormat:
    """Guess a weights file's format from its first bytes, never from its extension.

    Args:
        path: The file to inspect.

    Returns:
        ``"pickle-zip"`` (torch's zip format), ``"pickle"`` (a raw pickle), ``"safetensors"`` or
        ``"unknown"``.
    """
    with path.open("rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "pickle-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        # A header length past the end still reads as safetensors, so its parser can say what is wrong.
        if int.from_bytes(head[:8], "little") >= 2:
            return "safetensors"
    return "unknown"


def _format_mb(n_bytes: int) -> str:
    text = f"{n_bytes / 2**20:.1f}"
    return text.removesuffix(".0")


def _tensors_in(obj: object, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists/tuples (bounded depth: a plain weights object is shallow)."""
    if depth > 16:
        raise InvalidRequestError("This weights file is nested too deeply to be plain weights.")
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors_in(value, depth + 1)]
    if isinstance(obj, list | tuple):
        return [t for value in obj for t in _tensors_in(value, depth + 1)]
    return []


def _check_finite(tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> None:
    for tensor in tensors.values() if isinstance(tensors, dict) else tensors:
        if not tensor.is_floating_point():
            continue
        values = tensor if tensor.dtype in _NATIVE_FLOATS else tensor.to(torch.float32)
        if not bool(torch.isfinite(values).all()):
            raise InvalidRequestError(
                "This weights file contains NaN or infinite values; it is broken, so upload a working copy."
            )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    read_safetensors_header(path)
    try:
        tensors = load_file(path, device="cpu")
    except SafetensorError:
        log.info("safetensors refused %s after header validation", path, exc_info=True)
        raise _refuse("its data could not be read") from None
    _check_finite(tensors)
    return tensors


def _check_zip(path: Path, max_bytes: int) -> None:
    """Refuse a torch zip that unpacks to far more than its own size or than ``max_bytes`` (a zip bomb)
    before torch reads it.

    torch writes its members uncompressed, so a real file unpacks to about its own size; a file re-packed
    with compression unpacks to a little more (weights hardly compress). ``max_bytes`` alone is no bound:
    a 1 MB upload may not become a 1 GB allocation just because 1 GB files are allowed.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InvalidRequestError(
            "This weights file is damaged and could not be read; upload it again."
        ) from None
    unpacked = sum(m.file_size for m in members)
    limit = min(max_bytes, _ZIP_MAX_RATIO * path.stat().st_size + _ZIP_SLACK)
    if unpacked > limit or len(members) > 100_000:
        log.warning("refused a zip that unpacks to %d bytes: %s", unpacked, path)
        raise InvalidRequestError(
            "This file unpacks to far more data than it holds (a zip bomb?); upload the plain weights file."
        )


def _torch_load(path: Path, max_bytes: int) -> Any:
    """``torch.load(weights_only=True)`` from an open file, with our sentences for every failure."""
    if sniff_format(path) == "pickle-zip":
        _check_zip(path, max_bytes)
    try:
        # An open file, not a path: torch.load picks its loader by a path's extension, and ours is untrusted.
        with path.open("rb") as fh:
            obj: Any = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what the weights-only unpickler refuses: globals, calls, odd opcodes
        log.warning("refused pickled weights with code or unreadable content: %s", path, exc_info=True)
        raise InvalidRequestError(_CODE_MESSAGE) from None
    except Exception:  # hostile bytes trip torch's readers in many ways (IndexError, KeyError, ...)
        log.info("unreadable pickled weights: %s", path, exc_info=True)
        raise InvalidRequestError(
            "This weights file is damaged and could not be read; upload it again."
        ) from None
    return obj


def _load_pickle(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    obj = _torch_load(path, max_bytes)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InvalidRequestError(
            "This file does not hold a plain set of named weights; upload a .safetensors file instead."
        )
    return dict(obj)


def _check_size(path: Path, max_bytes: int) -> int:
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidRequestError(
            f"This weights file is larger than the {_format_mb(max_bytes)} MB limit; upload a smaller file."
        )
    return size


def load_pickle_object(path: Path, *, max_bytes: int) -> Any:
    """Load a torch-saved object of plain data (dicts, lists, numbers, text, tensors), never running code.

    For the webui's hypernetwork and ``.pt`` embedding files, which nest dicts keyed by numbers.

    Raises:
        InvalidRequestError: Too large, not a torch pickle, code inside, a zip bomb, or NaN/Inf values.
    """
    _check_size(path, max_bytes)
    if sniff_format(path) not in ("pickle-zip", "pickle"):
        raise InvalidRequestError("This is not a torch-saved file; upload the original .pt file.")
    obj = _torch_load(path, max_bytes)
    _check_finite(_tensors_in(obj))
    return obj


def load_state_dict(path: Path, *, max_bytes: int) -> dict[str, torch.Tensor]:
    """Load an untrusted weights file as a name-to-tensor dict on the CPU.

    Args:
        path: The file; its extension is ignored, the format is sniffed.
        max_bytes: Largest file accepted.

    Returns:
        The tensors by name.

    Raises:
        InvalidRequestError: Too large, an unknown or malformed format, code in a pickle, or NaN/Inf values.
    """
    size = _check_size(path, max_bytes)
    fmt = sniff_format(path)
    log.debug("loading %s weights from %s (%d bytes)", fmt, path, size)
    if fmt == "safetensors":
        return _load_safetensors(path)
    if fmt in ("pickle-zip", "pickle"):
        return _load_pickle(path, max_bytes)
    raise InvalidRequestError("This is not a weights file we can read; upload a .safetensors file instead.")

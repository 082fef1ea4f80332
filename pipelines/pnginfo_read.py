"""Low-level readers behind :func:`pipelines.pnginfo.read_info`.

Everything here works on untrusted input: it reads what it can and returns ``None`` or an empty result
for anything malformed, without raising. Decompression is bounded; pixels are decoded only for the
"stealth" alpha-channel check, and only for bounded RGBA PNGs.

The tool-specific readers return ``(prompt, negative_prompt, parameters)`` with the parameters under
the webui's labels (``Steps``, ``Sampler``, ``CFG scale``, ``Seed``, ``Size``, ``Model`` ...).
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "BAD_DATA",
    "Fields",
    "comfyui_fields",
    "decode_user_comment",
    "exif_fields",
    "format_value",
    "fooocus_fields",
    "invokeai_fields",
    "json_dict",
    "novelai_fields",
    "png_text_chunks",
    "stealth_alpha_text",
]

log = logging.getLogger(__name__)

Fields = tuple[str, str, dict[str, str]]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_CHUNK = 16 * 2**20  # decompressed bytes per zTXt/iTXt chunk
_MAX_STEALTH_PIXELS = 4096 * 4096
_STEALTH_SIGNATURES = {b"stealth_pnginfo": False, b"stealth_pngcomp": True}
_SIG_BITS = 15 * 8
_LEN_BITS = 32
#: what a malformed image or metadata block can raise from Pillow, numpy, zlib or json
BAD_DATA = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError, TypeError,
)  # fmt: skip

_EXIF_IFD = 0x8769
_TAG_USER_COMMENT = 0x9286
_TAG_SOFTWARE = 0x0131
_TAG_IMAGE_DESCRIPTION, _TAG_MAKE, _TAG_MODEL = 0x010E, 0x010F, 0x0110
_EXIF_STRING_TAGS = (_TAG_SOFTWARE, _TAG_IMAGE_DESCRIPTION, _TAG_MAKE, _TAG_MODEL)


def format_value(value: object) -> str:
    """Render a value as the webui prints it, except that integral floats print as integers (7.0 -> "7")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def json_dict(text: str | None) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object, or None."""
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- containers ---------------------------------------------------------------------------------------


def _inflate(data: bytes, wbits: int = zlib.MAX_WBITS) -> bytes | None:
    """Decompress at most ``_MAX_TEXT_CHUNK`` bytes; None when broken or larger."""
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(data, _MAX_TEXT_CHUNK)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out


def _text_chunk(ctype: bytes, body: bytes) -> tuple[str, str] | None:
    key, sep, rest = body.partition(b"\0")
    value: bytes | None = rest
    if ctype == b"zTXt":  # compression method, deflate stream
        value = _inflate(rest[1:]) if rest[:1] == b"\0" else None
    elif ctype == b"iTXt":  # compressed flag, method, language\0, translated key\0, text
        compressed, parts = rest[:1] not in (b"", b"\0"), rest[2:].split(b"\0", 2)
        if len(parts) != 3 or (compressed and rest[1:2] != b"\0"):
            value = None
        else:
            value = _inflate(parts[2]) if compressed else parts[2]
    if not sep or not key or value is None:
        return None
    return key.decode("latin-1"), value.decode("utf-8" if ctype == b"iTXt" else "latin-1", errors="replace")


def png_text_chunks(data: bytes) -> dict[str, str]:
    """Every tEXt/zTXt/iTXt chunk of a PNG, before or after IDAT (later keys win, as in Pillow).

    Chunks with a bad CRC or a broken compressed stream are skipped; a truncated file ends the walk.
    """
    chunks: dict[str, str] = {}
    if not data.startswith(_PNG_SIGNATURE):
        return chunks
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        start, end = pos + 8, pos + 8 + length
        if end + 4 > len(data) or ctype == b"IEND":
            break
        pos = end + 4
        if ctype not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        body = data[start:end]
        if zlib.crc32(ctype + body) != struct.unpack_from(">I", data, end)[0]:
            log.debug("skipping %s chunk with a bad CRC", ctype)
            continue
        item = _text_chunk(ctype, body)
        if item is not None:
            chunks[item[0]] = item[1]
    return chunks


def decode_user_comment(raw: bytes | str) -> str:
    """Decode an EXIF UserComment: the 8-byte charset prefix (UNICODE, ASCII, JIS or none), then text.

    The webui writes ``UNICODE\\0`` + UTF-16 in the EXIF byte order (big-endian via piexif); the byte
    order is taken from a BOM or guessed from where the zero bytes of ASCII-range text fall.
    """
    if isinstance(raw, str):
        return raw.rstrip("\0")
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            encoding, body = ("utf-16-be" if body[:2] == b"\xfe\xff" else "utf-16-le"), body[2:]
        else:
            zeros_even = body[0::2].count(0)
            zeros_odd = body[1::2].count(0)
            encoding = "utf-16-be" if zeros_even >= zeros_odd else "utf-16-le"
        text = body[: len(body) // 2 * 2].decode(encoding, errors="replace")
    elif prefix == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", errors="replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\0")


def exif_fields(image: Image.Image) -> dict[str, str]:
    """The EXIF values tools store generation data in, keyed like PNG text chunks.

    ``UserComment`` (A1111, Fooocus), ``Software``, and ComfyUI's ``prompt:{...}`` / ``workflow:{...}``
    strings in the IFD0 Make/Model/ImageDescription tags (its WebP/JPEG savers).
    """
    fields: dict[str, str] = {}
    try:
        exif = image.getexif()
        comment = exif.get_ifd(_EXIF_IFD).get(_TAG_USER_COMMENT, exif.get(_TAG_USER_COMMENT))
        values = {tag: exif.get(tag) for tag in _EXIF_STRING_TAGS}
    except BAD_DATA as exc:
        log.debug("unreadable EXIF: %s", exc)
        return fields
    if isinstance(comment, (bytes, str)):
        fields["UserComment"] = decode_user_comment(comment)
    software = values.pop(_TAG_SOFTWARE)
    if isinstance(software, str):
        fields["Software"] = software
    for value in values.values():
        if isinstance(value, str):
            key, sep, rest = value.partition(":")
            if sep and key.lower() in ("prompt", "workflow"):
                fields[key.lower()] = rest
    return fields


def stealth_alpha_text(image: Image.Image) -> str | None:
    """Text hidden by the webui's stealth-pnginfo extension in the low bit of alpha, or None.

    Layout, read column by column (x outer, y inner): the 15-byte signature ``stealth_pnginfo``
    (UTF-8 text) or ``stealth_pngcomp`` (gzip), a 32-bit big-endian payload length in bits, the payload.
    Only RGBA PNGs up to 4096x4096 are decoded.
    """
    width, height = image.size
    if image.format != "PNG" or image.mode != "RGBA" or not 0 < width * height <= _MAX_STEALTH_PIXELS:
        return None
    if width * height < _SIG_BITS + _LEN_BITS:
        return None
    try:
        alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
    except BAD_DATA as exc:
        log.debug("cannot decode pixels for the stealth check: %s", exc)
        return None
    bits = (alpha.T & 1).reshape(-1)
    compressed = _STEALTH_SIGNATURES.get(np.packbits(bits[:_SIG_BITS]).tobytes())
    if compressed is None:
        return None
    start = _SIG_BITS + _LEN_BITS
    length = int.from_bytes(np.packbits(bits[_SIG_BITS:start]).tobytes(), "big")
    if length == 0 or start + length > bits.size:
        return None
    payload = np.packbits(bits[start : start + length]).tobytes()
    if not compressed:
        return payload.decode("utf-8", errors="ignore")
    text = _inflate(payload, 16 + zlib.MAX_WBITS)
    try:
        return None if text is None else text.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- tools --------------------------------------------------------------------------------------------


def _params(pairs: dict[str, object]) -> dict[str, str]:
    """Keep the scalar, non-empty values, rendered with :func:`format_value`."""
    out: dict[str, str] = {}
    for key, value in pairs.items():
        if isinstance(value, (str, int, float)) and value != "":
            out[key] = format_value(value)
    return out


def _size(width: object, height: object) -> str | None:
    if isinstance(width, int) and isinstance(height, int) and not isinstance(width, bool):
        return f"{width}x{height}"
    return None


def _split_brackets(text: str) -> tuple[str, str]:
    """InvokeAI's legacy prompt syntax: ``[...]`` segments are the negative prompt."""
    negatives = [part.strip(" ,") for part in re.findall(r"\[([^\[\]]*)\]", text)]
    positive = re.sub(r"\[[^\[\]]*\]", "", text).strip(" ,")
    return positive, ", ".join(part for part in negatives if part)


_FOOOCUS_NAMES = {
    "Steps": "steps", "Sampler": "sampler", "Schedule type": "scheduler", "CFG scale": "guidance_scale",
    "Seed": "seed", "Size": "", "Model hash": "base_model_hash", "Model": "base_model", "Version": "version",
}  # fmt: skip
_NOVELAI_NAMES = {"Steps": "steps", "Sampler": "sampler", "CFG scale": "scale", "Seed": "seed", "Size": ""}


def fooocus_fields(meta: dict[str, Any]) -> Fields:
    """Fooocus' JSON scheme (``parameters`` chunk or EXIF UserComment)."""
    pairs: dict[str, object] = {label: meta.get(key) for label, key in _FOOOCUS_NAMES.items()}
    resolution = re.fullmatch(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*", str(meta.get("resolution", "")))
    pairs["Size"] = f"{resolution[1]}x{resolution[2]}" if resolution else None
    return str(meta.get("prompt") or ""), str(meta.get("negative_prompt") or ""), _params(pairs)


def novelai_fields(description: str, comment: dict[str, Any], source: str) -> Fields:
    """NovelAI: ``Description`` is the prompt, ``Comment`` JSON holds ``uc`` and the settings."""
    pairs: dict[str, object] = {label: comment.get(key) for label, key in _NOVELAI_NAMES.items()}
    pairs["Size"] = _size(comment.get("width"), comment.get("height"))
    pairs["Model"] = source
    prompt = description or str(comment.get("prompt") or "")
    return prompt.strip(), str(comment.get("uc") or "").strip(), _params(pairs)


def _invokeai_model(meta: dict[str, Any]) -> object:
    model = meta.get("model")
    if isinstance(model, dict):
        return model.get("model_name") or model.get("name")
    return model


def _dream_fields(dream: str) -> Fields | None:
    match = re.match(r'^"(.*?)"(.*)$', dream, re.DOTALL)
    if match is None:
        return None
    args = dict(re.findall(r"\s-(\w+)\s+(\S+)", match[2]))  # sd-parsers': \s+-(\w+)\s+([^\s]+), linear
    names = {"s": "Steps", "A": "Sampler", "C": "CFG scale", "S": "Seed"}
    params = _params({label: args.get(flag) for flag, label in names.items()})
    if "W" in args and "H" in args:
        params["Size"] = f"{args['W']}x{args['H']}"
    return (*_split_brackets(match[1]), params)


def _invokeai(prompt: object, negative: object, image: dict[str, Any], **extra: object) -> Fields:
    pairs: dict[str, object] = {
        "Steps": image.get("steps"),
        "Sampler": extra.get("sampler"),
        "CFG scale": image.get("cfg_scale"),
        "Seed": image.get("seed"),
        "Size": _size(image.get("width"), image.get("height")),
        "Model hash": extra.get("model_hash"),
        "Model": extra.get("model"),
    }
    return str(prompt or "").strip(), str(negative or "").strip(), _params(pairs)


def invokeai_fields(chunks: dict[str, str]) -> Fields | None:
    """InvokeAI: ``invokeai_metadata`` (3.x+), ``sd-metadata`` (2.x) or ``Dream`` (1.x) chunks."""
    meta = json_dict(chunks.get("invokeai_metadata"))
    if meta is not None:
        prompt, negative = meta.get("positive_prompt"), meta.get("negative_prompt")
        return _invokeai(prompt, negative, meta, sampler=meta.get("scheduler"), model=_invokeai_model(meta))
    legacy = json_dict(chunks.get("sd-metadata"))
    image = legacy.get("image") if legacy is not None else None
    if legacy is not None and isinstance(image, dict):
        prompts = image.get("prompt")
        if isinstance(prompts, list):
            prompts = " ".join(str(p.get("prompt", "")) for p in prompts if isinstance(p, dict))
        prompt, negative = _split_brackets(str(prompts or ""))
        extra = {"model": legacy.get("model_weights"), "model_hash": legacy.get("model_hash")}
        return _invokeai(prompt, negative, image, sampler=image.get("sampler"), **extra)
    dream = chunks.get("Dream")
    return _dream_fields(dream) if dream else None


# ComfyUI: the API-format ``prompt`` graph, {node_id: {"class_type": ..., "inputs": {...}}}; an input that
# is a link is ``[source_node_id, output_slot]``.
_COMFY_SAMPLER_INPUTS = {"sampler_name", "steps", "cfg"}
_COMFY_TEXT_INPUTS = ("text", "text_g", "text_l", "string", "value", "prompt")
_COMFY_MAX_DEPTH = 32


def _node_order(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), "") if node_id.isdecimal() else (1, 0, node_id)


def _linked(nodes: dict[str, dict[str, Any]], value: object) -> tuple[str, dict[str, Any]] | None:
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in nodes:
        node_id = str(value[0])
        inputs = nodes[node_id].get("inputs")
        return (node_id, inputs) if isinstance(inputs, dict) else None
    return None


def _comfy_texts(nodes: dict[str, dict[str, Any]], link: object, polarity: str) -> list[str]:
    """The prompt texts feeding a sampler's ``positive``/``negative`` input, following conditioning links."""
    texts: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[object, int]] = [(link, 0)]
    while stack:
        value, depth = stack.pop()
        found = _linked(nodes, value)
        if found is None or found[0] in seen or depth > _COMFY_MAX_DEPTH:
            continue
        node_id, inputs = found
        seen.add(node_id)
        own = [inputs[key] for key in _COMFY_TEXT_INPUTS if key in inputs]
        if own:
            for item in own:
                if isinstance(item, str):
                    texts.append(item.strip())
                else:  # text wired from another node (a primitive or string node)
                    stack.append((item, depth + 1))
            continue
        for name in reversed(list(inputs)):
            if name.startswith("conditioning") or name == polarity:
                stack.append((inputs[name], depth + 1))
    return list(dict.fromkeys(text for text in texts if text))


def _comfy_model(nodes: dict[str, dict[str, Any]], link: object) -> object:
    for _ in range(_COMFY_MAX_DEPTH):
        found = _linked(nodes, link)
        if found is None:
            return None
        inputs = found[1]
        for key in ("ckpt_name", "unet_name", "model_name"):
            if isinstance(inputs.get(key), str):
                return inputs[key]
        link = inputs.get("model")
    return None


def comfyui_fields(graph: dict[str, Any]) -> Fields:
    """Prompt, negative prompt and settings of the first sampler node (lowest id) of a ComfyUI graph."""
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict) and isinstance(v.get("inputs"), dict)}
    samplers = [k for k in nodes if _COMFY_SAMPLER_INPUTS <= nodes[k]["inputs"].keys()]
    if not samplers:
        return "", "", {}
    inputs = nodes[min(samplers, key=_node_order)]["inputs"]
    latent = _linked(nodes, inputs.get("latent_image"))
    seed = inputs.get("seed", inputs.get("noise_seed"))
    params = _params(
        {
            "Steps": inputs.get("steps"),
            "Sampler": inputs.get("sampler_name"),
            "Schedule type": inputs.get("scheduler"),
            "CFG scale": inputs.get("cfg"),
            "Seed": seed,
            "Size": _size(latent[1].get("width"), latent[1].get("height")) if latent else None,
            "Model": _comfy_model(nodes, inputs.get("model")),
            "Denoising strength": inputs.get("denoise"),
        }
    )
    positive = "\n".join(_comfy_texts(nodes, inputs.get("positive"), "positive"))
    negative = "\n".join(_comfy_texts(nodes, inputs.get("negative"), "negative"))
    return positive, negative, params

"""Generation parameters in images: write the AUTOMATIC1111 ``parameters`` text, read what any tool wrote.

Writing follows the webui (``modules/processing.py`` ``create_infotext`` and ``quote`` in
``modules/infotext_utils.py``)::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: tiny

with one deliberate choice: integral floats print as integers (``CFG scale: 7``, as the webui UI's own
images show; its API writes ``7.0``). Readers (the webui, sd-parsers) take either to the same number.

Reading understands AUTOMATIC1111 (PNG text chunk, JPEG/WebP EXIF UserComment, "stealth" alpha-channel
info), ComfyUI, InvokeAI, NovelAI and Fooocus images; see :func:`read_info`.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from PIL import Image, PngImagePlugin

from pipelines import pnginfo_read as rd
from storage.errors import InvalidRequestError

__all__ = [
    "TOOLS",
    "ImageInfo",
    "format_parameters",
    "parse_parameters",
    "png_bytes",
    "read_info",
]

log = logging.getLogger(__name__)

A1111: Final = "AUTOMATIC1111"
COMFYUI: Final = "ComfyUI"
INVOKEAI: Final = "InvokeAI"
NOVELAI: Final = "NovelAI"
FOOOCUS: Final = "Fooocus"
TOOLS: Final = (A1111, COMFYUI, INVOKEAI, NOVELAI, FOOOCUS)

NOT_AN_IMAGE: Final = "That file is not an image I can read; attach a PNG, JPEG or WebP."
TOO_LARGE: Final = "That image has too many pixels for me to read; attach a smaller PNG, JPEG or WebP."

# create_infotext's fixed keys, in its order (webui 1.10, plus NGMS where 1.6-1.8 put it); everything else
# (extra_generation_params: Hires upscale, Lora hashes, ControlNet 0, ...) follows in the order given,
# then Version and User.
_LEADING_KEYS: Final = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight",
    "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "NGMS",
    "Tiling",
)  # fmt: skip
_TRAILING_KEYS: Final = ("Version", "User")
_SIZE_KEYS: Final = frozenset({"Size", "Seed resize from", "Hires resize", "First pass size"})
_KEY = re.compile(r"\w[\w \-/]+")
_KEY_RUN = re.compile(r"[\w \-/]+")
_WORD = re.compile(r"\w")
_SPACES = re.compile(r"\s*")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')
_FORMATS: Final = ("PNG", "JPEG", "WEBP")
_PNG_MODES: Final = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


@dataclass(frozen=True)
class ImageInfo:
    """What an image says about how it was made.

    Attributes:
        tool: "AUTOMATIC1111", "ComfyUI", "InvokeAI", "NovelAI" or "Fooocus"; None when nothing was found.
        prompt: The positive prompt ("" when unknown).
        negative_prompt: The negative prompt ("" when none).
        parameters: Settings under the webui's labels ("Steps", "Sampler", "CFG scale", "Seed", "Size", ...);
            for A1111 text every ``Key: value`` pair of its last line, quoted values unquoted.
        raw: The metadata text the fields were read from (A1111 text, or the tool's JSON).
    """

    tool: str | None
    prompt: str = ""
    negative_prompt: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    raw: str = ""


# --- the A1111 text -----------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """infotext_utils.quote: JSON-quote a value holding a comma, colon or newline."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _render(key: str, value: object) -> str:
    if key in _SIZE_KEYS and isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{rd.format_value(value[0])}x{rd.format_value(value[1])}"
    return rd.format_value(value)


def format_parameters(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The webui's infotext: prompt, ``Negative prompt: ...`` (if any), then the ``Key: value`` line.

    Args:
        prompt: The positive prompt (may span lines).
        negative_prompt: The negative prompt; "" leaves its line out.
        params: Settings under the webui's labels ("Steps", "Sampler", "CFG scale", "Seed", "Size", ...).
            Known labels come out in the webui's order, others after them in the order given, then
            "Version" and "User". None and "" values are left out. "Size" (and the other size labels)
            may be a ``(width, height)`` pair.

    Raises:
        ValueError: A key the webui could not read back (it must match ``\\w[\\w \\-/]+``).
    """
    for key in params:
        if not _KEY.fullmatch(key) or key != key.strip():
            raise ValueError(f"parameter name {key!r} cannot be written in A1111 infotext")
    extras = [k for k in params if k not in _LEADING_KEYS and k not in _TRAILING_KEYS]
    ordered = [k for k in _LEADING_KEYS if k in params] + extras + [k for k in _TRAILING_KEYS if k in params]
    pairs = []
    for key in ordered:
        value = params[key]
        if value is None or value == "":
            continue
        text = _render(key, value)
        pairs.append(key if text == key else f"{key}: {_quote(text)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def _find_params(line: str) -> list[tuple[str, str]]:
    r"""``re.findall(re_param, line)`` as the webui runs it, in linear time.

    ``re_param`` is ``\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)``; ``re`` rescans a run of
    key characters from each of its positions, which is quadratic on a long line without colons. Here a
    match is the key-character run before a ``:`` from its first word character at or after the end of
    the previous match, then the quoted or the comma-free value.
    """
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(line)
    for run in _KEY_RUN.finditer(line):
        start, colon = run.span()
        if colon >= end or line[colon] != ":" or colon <= pos:
            continue
        word = _WORD.search(line, max(start, pos), colon)
        if word is None or colon - word.start() < 2:
            continue
        spaces = _SPACES.match(line, colon + 1)
        value_start = spaces.end() if spaces else colon + 1
        quoted = _QUOTED.match(line, value_start)
        after = quoted.end() if quoted else -1
        if quoted and (after == end or line[after] == "," or (after == end - 1 and line[after] == "\n")):
            value, pos = quoted.group(), after + (after < end and line[after] == ",")
        else:
            comma = line.find(",", value_start)
            value, pos = (line[value_start:], end) if comma < 0 else (line[value_start:comma], comma + 1)
        pairs.append((line[word.start() : colon], value))
    return pairs


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Split A1111 infotext like the webui's ``parse_generation_parameters``.

    The last line is the settings line when it holds at least 3 ``key: value`` pairs; the lines before it
    are the prompt, up to a line starting with ``Negative prompt:``. Lines are stripped; quoted values
    are unquoted; pairs with an empty value are dropped; "Size" stays ``WxH``.

    Returns:
        ``(prompt, negative_prompt, parameters)``.
    """
    *lines, last = text.strip().split("\n")
    if len(_find_params(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done_with_prompt = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[len("Negative prompt:") :].strip()
        if done_with_prompt:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    params: dict[str, str] = {}
    for key, value in _find_params(last):
        if value:
            params[key] = _unquote(value) if value[0] == '"' and value[-1] == '"' else value
    return prompt, negative, params


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """Encode ``image`` as PNG carrying ``parameters`` in a ``parameters`` text chunk, and nothing else.

    The chunk is tEXt, or iTXt when the text is not latin-1 (Pillow's ``PngInfo.add_text``, as the webui
    uses). No ICC profile, EXIF or other text is written; an empty ``parameters`` writes no chunk. Modes
    PNG cannot hold are converted to RGB(A).
    """
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, icc_profile=None)
    return out.getvalue()


# --- reading ------------------------------------------------------------------------------------------


def _a1111(text: str, tool: str = A1111) -> ImageInfo:
    prompt, negative, params = parse_parameters(text)
    return ImageInfo(tool, prompt, negative, params, text)


def _fooocus(text: str, scheme: str | None) -> ImageInfo:
    """Fooocus writes its JSON scheme, or A1111 text when its scheme is "a1111"."""
    meta = rd.json_dict(text) if scheme != "a1111" else None
    return _a1111(text, FOOOCUS) if meta is None else ImageInfo(FOOOCUS, *rd.fooocus_fields(meta), text)


def _from_chunks(chunks: Mapping[str, str]) -> ImageInfo | None:
    """Recognise a tool from PNG-style ``key -> text`` metadata."""
    text = chunks.get("parameters")
    if text is not None and text.strip():
        if "fooocus_scheme" in chunks or text.lstrip().startswith("{"):
            return _fooocus(text, chunks.get("fooocus_scheme"))
        return _a1111(text)
    graph = rd.json_dict(chunks.get("prompt"))
    if graph is not None:
        return ImageInfo(COMFYUI, *rd.comfyui_fields(graph), chunks["prompt"])
    if rd.json_dict(chunks.get("workflow")) is not None:  # UI-format graph only: no sampler inputs to read
        return ImageInfo(COMFYUI, raw=chunks["workflow"])
    invoke = rd.invokeai_fields(dict(chunks))
    if invoke is not None:
        raw = next(chunks[k] for k in ("invokeai_metadata", "sd-metadata", "Dream") if k in chunks)
        return ImageInfo(INVOKEAI, *invoke, raw)
    comment = rd.json_dict(chunks.get("Comment"))
    if chunks.get("Software") == "NovelAI" and comment is not None:
        fields = rd.novelai_fields(chunks.get("Description", ""), comment, chunks.get("Source", ""))
        return ImageInfo(NOVELAI, *fields, chunks["Comment"])
    return None


def _from_exif(image: Image.Image) -> ImageInfo | None:
    """JPEG/WebP: EXIF UserComment (A1111, Fooocus), ComfyUI's EXIF strings, or a JPEG comment."""
    fields = rd.exif_fields(image)
    if "prompt" in fields or "workflow" in fields:
        return _from_chunks(fields)
    comment = fields.get("UserComment", "")
    if comment.strip():
        if fields.get("Software", "").startswith("Fooocus") or comment.lstrip().startswith("{"):
            return _fooocus(comment, None)
        if len(_find_params(comment.strip().split("\n")[-1])) >= 3:
            return _a1111(comment)
    jpeg_comment = image.info.get("comment")
    if isinstance(jpeg_comment, bytes):
        text = jpeg_comment.decode("utf-8", errors="replace")
        if len(_find_params(text.strip().split("\n")[-1])) >= 3:
            return _a1111(text)
    return None


def _from_stealth(image: Image.Image) -> ImageInfo | None:
    text = rd.stealth_alpha_text(image)
    if not text or not text.strip():
        return None
    meta = rd.json_dict(text)
    if meta is not None:  # NovelAI hides its PNG text chunks as one JSON object
        return _from_chunks({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return _a1111(text)


def _read(image: Image.Image, data: bytes) -> ImageInfo:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise InvalidRequestError(TOO_LARGE)
    found = _from_chunks(rd.png_text_chunks(data)) if image.format == "PNG" else _from_exif(image)
    if found is None and image.format == "PNG":
        found = _from_stealth(image)
    return found or ImageInfo(None)


def read_info(data: bytes) -> ImageInfo:
    """Read the generation parameters stored in an image file's bytes.

    Looks, in order, at: PNG text chunks (tEXt/zTXt/iTXt, before or after the pixel data) for A1111
    ``parameters``, Fooocus, ComfyUI ``prompt``/``workflow``, InvokeAI and NovelAI; JPEG/WebP EXIF; and,
    when a PNG has none of those, A1111 "stealth" info in the alpha channel (RGBA PNGs up to 4096x4096).

    Returns:
        The info; ``ImageInfo(tool=None)`` for an image without generation metadata.

    Raises:
        InvalidRequestError: The bytes are not a PNG, JPEG or WebP Pillow can open, or the image has more
            pixels than Pillow's decompression-bomb limit.
    """
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            return _read(image, data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(TOO_LARGE) from None
    except rd.BAD_DATA as exc:
        log.info("unreadable image upload (%d bytes): %s", len(data), exc)
        raise InvalidRequestError(NOT_AN_IMAGE) from None

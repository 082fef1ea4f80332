"""Fit finished images into a Discord upload limit, and lay out a preview grid.

Discord tells a bot, with each interaction, how many bytes it may upload per message in that guild
(``Interaction.filesize_limit``; 10 MiB without boosts). :func:`encode_for_upload` keeps the original
PNGs when they fit together in one message; otherwise it tries, in order, lossless WebP, then JPEG at
qualities :data:`JPEG_QUALITIES` (4:4:4 chroma, no subsampling) and uses the first that fits. WebP and
JPEG files carry the generation parameters as the AUTOMATIC1111 webui writes them for those formats: an
EXIF ``UserComment`` of ``b"UNICODE\\0"`` plus UTF-16-BE text (``piexif.helper.UserComment.dump(...,
encoding="unicode")``), which :func:`pipelines.pnginfo.read_info` and the webui read back.

When not even the smallest JPEGs fit in one message, the images are split across several messages
(:attr:`Delivery.messages`), using the encoding that needs the fewest messages (the better quality on a
tie). Only when one image alone cannot fit, even as the smallest JPEG, is an error raised.

Encoding is CPU work (tens of milliseconds per megapixel): call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from PIL import Image

from pipelines import pnginfo_read as rd
from storage.errors import InvalidRequestError

__all__ = [
    "JPEG_QUALITIES",
    "MAX_FILES_PER_MESSAGE",
    "Delivery",
    "ImageFormat",
    "UploadFile",
    "encode_for_upload",
    "exif_user_comment",
    "grid",
]

log = logging.getLogger(__name__)

ImageFormat = Literal["png", "webp", "jpeg"]
#: (filename, file bytes)
UploadFile = tuple[str, bytes]

#: JPEG qualities tried, best first; the last one is the floor.
JPEG_QUALITIES: Final = (95, 90, 85, 80)
#: Discord's limit on attachments per message.
MAX_FILES_PER_MESSAGE: Final = 10
#: Pillow's lossless WebP effort (its defaults): ``quality`` is effort in lossless mode.
_WEBP_EFFORT: Final = {"quality": 80, "method": 4}
_EXIF_IFD: Final = 0x8769
_TAG_USER_COMMENT: Final = 0x9286
_JPEG_SEGMENT_MAX: Final = 65533  # payload bytes of one JPEG APPn/COM segment
_EXTENSIONS: Final[dict[str, str]] = {"png": "png", "webp": "webp", "jpeg": "jpg"}

TOO_BIG: Final = (
    "The images are too big for this server's upload limit even as JPEG; ask for a smaller size "
    "(or no upscale), and find the full PNGs in /history."
)
_HISTORY: Final = "the full PNGs and their parameters stay in /history"


@dataclass(frozen=True)
class Delivery:
    """What to upload, and how.

    Attributes:
        messages: The files to send, one list per Discord message, in order (one list unless the files
            could not fit in a single message); each file is ``(filename, bytes)``.
        format: The encoding of every file: "png" (the originals, unchanged), "webp" (lossless) or "jpeg".
        note: One sentence for the user when the files are not the original PNGs or are split across
            messages; None otherwise.
        jpeg_quality: The JPEG quality used, or None for PNG/WebP.
    """

    messages: list[list[UploadFile]]
    format: ImageFormat
    note: str | None = None
    jpeg_quality: int | None = None

    @property
    def files(self) -> list[UploadFile]:
        """Every file, in order, across all messages."""
        return [item for message in self.messages for item in message]


@dataclass(frozen=True)
class _Encoding:
    format: ImageFormat
    quality: int | None
    files: list[UploadFile]


def exif_user_comment(parameters: str) -> bytes:
    """EXIF bytes holding ``parameters`` in ``UserComment`` as the webui writes it (UNICODE, UTF-16-BE)."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_TAG_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return exif.tobytes()


def _open_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.load()
        return image


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def _webp(image: Image.Image, parameters: str) -> bytes:
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    extra = {"exif": exif_user_comment(parameters)} if parameters else {}
    out = io.BytesIO()
    image.save(out, format="WEBP", lossless=True, **_WEBP_EFFORT, **extra)
    return out.getvalue()


def _jpeg(image: Image.Image, parameters: str, quality: int) -> bytes:
    """JPEG with the parameters in EXIF; in a COM segment (UTF-8) when EXIF would exceed one segment."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    extra: dict[str, bytes] = {}
    if parameters:
        exif = exif_user_comment(parameters)
        comment = parameters.encode("utf-8")
        if len(exif) <= _JPEG_SEGMENT_MAX:
            extra["exif"] = exif
        elif len(comment) <= _JPEG_SEGMENT_MAX:
            extra["comment"] = comment
        else:
            log.warning("parameters too long for a JPEG (%d bytes); sent without them", len(comment))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, subsampling=0, optimize=True, **extra)
    return out.getvalue()


def _pack(files: list[UploadFile], limit_bytes: int, max_files: int) -> list[list[UploadFile]] | None:
    """Group consecutive files into messages within both limits; None when one file alone is too big."""
    messages: list[list[UploadFile]] = []
    current: list[UploadFile] = []
    used = 0
    for item in files:
        size = len(item[1])
        if size > limit_bytes:
            return None
        if current and (used + size > limit_bytes or len(current) >= max_files):
            messages.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        messages.append(current)
    return messages


def _note(encoding: _Encoding, count: int, messages: int) -> str | None:
    """One sentence saying how the files differ from the originals in one message, or None."""
    pronoun = "they are" if count > 1 else "it is"
    limit = "this server's upload limit"
    split = f" in {messages} messages" if messages > 1 else ""
    if encoding.format == "png":
        if messages == 1:
            return None
        return f"The images are too big for one message under {limit}, so they come{split}."
    subject = "The PNGs were" if count > 1 else "The PNG was"
    kind = "lossless WebP" if encoding.format == "webp" else "JPEG"
    return f"{subject} too big for {limit}, so {pronoun} sent as {kind}{split}; {_HISTORY}."


def _delivery(encoding: _Encoding, messages: list[list[UploadFile]]) -> Delivery:
    note = _note(encoding, len(encoding.files), len(messages))
    return Delivery(messages, encoding.format, note, encoding.quality)


def _encodings(pngs: Sequence[bytes], stems: Sequence[str]) -> Iterator[_Encoding]:
    """The ladder, best first: the originals, lossless WebP, then JPEG at each quality (lazily)."""
    yield _Encoding("png", None, [(f"{stem}.png", data) for stem, data in zip(stems, pngs, strict=True)])
    images = [_open_png(data) for data in pngs]
    params = [rd.png_text_chunks(data).get("parameters", "") for data in pngs]
    webp = [_webp(image, text) for image, text in zip(images, params, strict=True)]
    yield _Encoding("webp", None, [(f"{stem}.webp", data) for stem, data in zip(stems, webp, strict=True)])
    for quality in JPEG_QUALITIES:
        jpegs = [_jpeg(image, text, quality) for image, text in zip(images, params, strict=True)]
        yield _Encoding("jpeg", quality, [(f"{s}.jpg", data) for s, data in zip(stems, jpegs, strict=True)])


def encode_for_upload(
    pngs: Sequence[bytes],
    limit_bytes: int,
    *,
    stems: Sequence[str] | None = None,
    max_files_per_message: int = MAX_FILES_PER_MESSAGE,
) -> Delivery:
    """Choose the best encoding of ``pngs`` that fits Discord's upload limit.

    The limit applies to the sum of a message's file sizes. The first step of the ladder (original
    PNGs, lossless WebP, JPEG 95 ... :data:`JPEG_QUALITIES` floor) whose files all fit in one message
    wins. If none does, the files are split over several messages with the step that needs the fewest
    (the earlier step on a tie), keeping their order.

    Args:
        pngs: PNG files, as written by :func:`pipelines.pnginfo.png_bytes` (webui ``parameters`` chunk).
        limit_bytes: The upload limit per message, e.g. ``interaction.filesize_limit``.
        stems: File names without extension, one per PNG; default ``image-1``, ``image-2``, ...
        max_files_per_message: Attachments per message (Discord allows 10).

    Returns:
        The files to send and a note for the user when they are not the originals in one message.

    Raises:
        InvalidRequestError: One image alone exceeds the limit even as the smallest JPEG.
        ValueError: No PNGs, a non-positive limit, or ``stems`` of the wrong length.
    """
    if not pngs or limit_bytes <= 0 or max_files_per_message <= 0:
        raise ValueError("encode_for_upload needs at least one PNG and positive limits")
    names = list(stems) if stems is not None else [f"image-{i}" for i in range(1, len(pngs) + 1)]
    if len(names) != len(pngs):
        raise ValueError(f"got {len(names)} stems for {len(pngs)} images")
    tried: list[_Encoding] = []
    for encoding in _encodings(pngs, names):
        sizes = [len(data) for _, data in encoding.files]
        log.debug("%s q=%s: %d bytes, limit %d", encoding.format, encoding.quality, sum(sizes), limit_bytes)
        if sum(sizes) <= limit_bytes and len(sizes) <= max_files_per_message:
            return _delivery(encoding, [encoding.files])
        tried.append(encoding)
    best: tuple[_Encoding, list[list[UploadFile]]] | None = None
    for encoding in tried:
        packed = _pack(encoding.files, limit_bytes, max_files_per_message)
        if packed is not None and (best is None or len(packed) < len(best[1])):
            best = (encoding, packed)
    if best is None:
        log.info("%d images do not fit a %d-byte upload limit even as JPEG", len(pngs), limit_bytes)
        raise InvalidRequestError(TOO_BIG)
    return _delivery(*best)


def grid(images: Sequence[Image.Image], *, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Lay images out in a near-square grid: 1x1 for 1, 1 row of 2 for 2, 2x2 for 3 (one cell empty) and 4.

    In general ``ceil(sqrt(n))`` columns and as many rows as needed, filled row by row. Cells are the
    size of the largest image; a smaller image is centred in its cell. The grid is RGBA (empty cells
    transparent) when any image has an alpha channel, else RGB with empty cells in ``background``.

    Raises:
        ValueError: No images.
    """
    if not images:
        raise ValueError("grid needs at least one image")
    count = len(images)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    alpha = any(_has_alpha(image) for image in images)
    mode, fill = ("RGBA", (0, 0, 0, 0)) if alpha else ("RGB", background)
    canvas = Image.new(mode, (columns * cell_w, rows * cell_h), fill)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        x = column * cell_w + (cell_w - image.width) // 2
        y = row * cell_h + (cell_h - image.height) // 2
        canvas.paste(image.convert(mode), (x, y))
    return canvas

"""Bad and odd images through the real Discord path (/img2img, /inpaint on the double): the refused ones
get one private sentence and store nothing; the odd but unambiguous ones (CMYK, 16-bit, palette,
animated, EXIF-rotated, a mask of another size) are converted, said in the result's note, and run."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from pipelines.engine import Engine
from pipelines.settings import Settings
from storage import jobs as job_rows
from storage.tables import Job
from tests.cogs.conftest import serving, settled_message, wait_job_message
from tests.cogs.replies import count_rows, shown, stored_files
from tests.discord_double import DiscordDouble, Guild, InteractionRecord, StoredMessage, User

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOT_AN_IMAGE = "That file is not an image I can read; attach a PNG, JPEG or WebP."
DAMAGED = "That image is damaged or cut short; send the whole file again."


# --- the files ------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Incompressible pixels, so that a cut file is cut inside its pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header (CRC fixed) claims another size: what a decompression bomb looks like."""
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _two_frames(fmt: str) -> bytes:
    """Red, then blue: the first frame is the one used."""
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _upright() -> Image.Image:
    """Portrait 64×128, red above blue: what the person sees."""
    image = Image.new("RGB", (64, 128), "blue")
    image.paste((255, 0, 0), (0, 0, 64, 64))
    return image


def _exif_rotated_jpeg() -> bytes:
    """A phone photo: the sensor's pixels lie on their side (128×64), EXIF orientation 6 stands them up."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return _encode(_upright().transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)


def _mask(size: tuple[int, int], box: tuple[int, int, int, int] | None) -> bytes:
    mask = Image.new("L", size, 0)
    if box is not None:
        mask.paste(255, box)
    return _encode(mask)


def _eps() -> bytes:
    """PostScript: Pillow would hand it to Ghostscript, were it allowed to open it."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\n"


BLUE_PNG = _encode(Image.new("RGB", (64, 64), "blue"))


# --- the cases ------------------------------------------------------------------------------------

Upload = tuple[str, bytes, str]  # file name, bytes, content type (as Discord reports it)


@dataclass(frozen=True)
class Case:
    """One bad or odd image: what is sent, with which command, and what must happen."""

    id: str
    kind: str
    command: str
    files: dict[str, Upload]
    sentence: str | None = None  # refused: exactly this; None: accepted
    notes: tuple[str, ...] = ()  # accepted: these notes are shown with the result
    options: dict[str, Any] = field(default_factory=dict)


def _img2img(name: str, data: bytes, content_type: str = "image/png") -> dict[str, Upload]:
    return {"image": (name, data, content_type)}


def _inpaint(mask: bytes, image: bytes = BLUE_PNG) -> dict[str, Upload]:
    return {"image": ("photo.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}


REFUSED = [
    Case("not-an-image", "text bytes named photo.png", "img2img",
         _img2img("photo.png", b"this is a shopping list, not a picture"), NOT_AN_IMAGE),
    Case("not-an-image-type", "a PDF (Discord says application/pdf)", "img2img",
         _img2img("scan.pdf", b"%PDF-1.4\n%...", "application/pdf"),
         "The image must be an image (PNG, JPEG or WebP), not application/pdf."),
    Case("empty-image", "a 0-byte photo.png", "img2img", _img2img("photo.png", b""),
         "That file is empty; attach a PNG, JPEG or WebP image."),
    Case("truncated-png", "the first half of a 64×64 PNG", "img2img",
         _img2img("cut.png", _encode(_noise())[: len(_encode(_noise())) // 2]), DAMAGED),
    Case("truncated-jpeg", "the first half of a 64×64 JPEG", "img2img",
         _img2img("cut.jpg", _encode(_noise(), "JPEG")[: len(_encode(_noise(), "JPEG")) // 2], "image/jpeg"),
         DAMAGED),
    Case("decompression-bomb", "a 70-byte PNG claiming 30000×30000", "img2img",
         _img2img("bomb.png", _png_claiming(30000, 30000)),
         "That image is far too large to decode; send one under 16 megapixels."),
    Case("huge-dimensions", "a PNG header claiming 5000×5000 (25 megapixels)", "img2img",
         _img2img("big.png", _png_claiming(5000, 5000)),
         "That image is 5000×5000; send one of at most 16 megapixels."),
    Case("huge-header-no-pixels", "a PNG header claiming 4096×4096 with no pixel data", "img2img",
         _img2img("hollow.png", _png_claiming(4096, 4096)), DAMAGED),
    Case("one-pixel", "a 1×1 PNG", "img2img", _img2img("dot.png", _encode(Image.new("RGB", (1, 1)))),
         "That image is only 1×1; send one at least 8 pixels on each side."),
    Case("eps-named-png", "PostScript named photo.png (Ghostscript bait)", "img2img",
         _img2img("photo.png", _eps()), NOT_AN_IMAGE),
    Case("tiff-named-png", "a TIFF named photo.png", "img2img",
         _img2img("photo.png", _encode(Image.new("RGB", (64, 64)), "TIFF")), NOT_AN_IMAGE),
    Case("over-25-mb", "a 26 MB attachment (refused before download)", "img2img",
         _img2img("huge.png", bytes(26 * 2**20)), "The image is 26.0 MB; attach one under 25 MB."),
    Case("mask-all-black", "/inpaint with an all-black mask", "inpaint",
         _inpaint(_mask((64, 64), None)),
         "The mask is all black, so there is nothing to repaint; paint the area to change in white."),
    Case("mask-not-an-image", "/inpaint with a text file as the mask", "inpaint",
         _inpaint(b"white = repaint"), "The mask is not an image I can read; attach a PNG, JPEG or WebP."),
    Case("mask-truncated", "/inpaint with half a mask PNG", "inpaint",
         _inpaint(_encode(_noise())[:300]), "The mask is damaged or cut short; send the whole file again."),
    Case("control-not-an-image", "/controlnet with a text file as the sketch", "controlnet",
         {"control": ("sketch.png", b"a circle, roughly", "image/png")},
         "The control image is not an image I can read; attach a PNG, JPEG or WebP."),
    Case("inpaint-no-mask", "/inpaint without a mask, on an opaque image", "inpaint",
         {"image": ("photo.png", BLUE_PNG, "image/png")},
         "The inpaint mode needs a mask (white where to repaint) or an image with transparent areas."),
]  # fmt: skip

ACCEPTED = [
    Case("cmyk-jpeg", "a CMYK JPEG", "img2img",
         _img2img("print.jpg", _encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), "image/jpeg"),
         notes=("Image: It was in CMYK; it was converted to RGB.",)),
    Case("16-bit-png", "a 16-bit greyscale PNG", "img2img",
         _img2img("deep.png", _encode(Image.new("I;16", (64, 64), 40000))),
         notes=("Image: It had more than 8 bits per channel; it was reduced to 8.",)),
    Case("palette-png", "a palette (P mode) PNG", "img2img",
         _img2img("gif-like.png", _encode(Image.new("RGB", (64, 64), "red").quantize(8)))),
    Case("animated-gif", "a two-frame GIF (red, blue)", "img2img",
         _img2img("anim.gif", _two_frames("GIF"), "image/gif"),
         notes=("Image: It is animated; only its first frame was used.",)),
    Case("animated-png", "a two-frame APNG (red, blue)", "img2img",
         _img2img("anim.png", _two_frames("PNG")),
         notes=("Image: It is animated; only its first frame was used.",)),
    Case("exif-rotated-jpeg", "a JPEG lying on its side with EXIF orientation 6", "img2img",
         _img2img("phone.jpg", _exif_rotated_jpeg(), "image/jpeg"),
         notes=("Image: Its EXIF orientation was applied.",)),
    Case("mask-other-size", "/erase: a 32×32 mask for a 64×64 image (/inpaint's mask path)", "erase",
         _inpaint(_mask((32, 32), (8, 8, 24, 24))),
         notes=("The mask was 32×32; it was resized to the image's 64×64.",)),
]  # fmt: skip


# --- helpers --------------------------------------------------------------------------------------


@dataclass
class World:
    """One bot on the double for the whole module: every case also shows it survived the ones before."""

    double: DiscordDouble
    engine: Engine
    guild: Guild
    alice: User
    data_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("bad-images") / "data"
    settings = Settings(data_dir=data_dir, builtin_models_dir=tiny_models, preview_every=2)

    def people(double: DiscordDouble) -> tuple[Guild, User]:
        guild = double.add_guild("Dream Guild", nsfw_channel=True)
        return guild, double.add_user("alice", guild)

    async with serving(settings, people) as (double, engine, _, (guild, alice)):
        yield World(double, engine, guild, alice, data_dir)




async def send(w: World, case: Case) -> InteractionRecord:
    attachments = {
        option: w.double.add_attachment(name, data, content_type)
        for option, (name, data, content_type) in case.files.items()
    }
    options = {} if case.command == "erase" else {"prompt": "a red circle", "seed": 1, **case.options}
    if case.command == "img2img":
        options.setdefault("steps", 2)
    user, guild = w.alice, w.guild
    return await w.double.slash(user, guild, None, case.command, options=options, attachments=attachments)


async def one_sentence(record: InteractionRecord) -> str:
    """The one private message the interaction ends with: a single sentence, no path, no crash ref.

    (``tests.cogs.replies.sentence``, with a shorter wait for stray extra messages.)
    """
    await settled_message(record, lambda m: not m.loading and bool(m.content), timeout=30)
    await record.settled(quiet=0.1, timeout=30)
    messages = shown(record)
    assert len(messages) == 1 and messages[0].ephemeral, [(m.content, m.ephemeral) for m in messages]
    assert not record.errors, [(a.kind, a.status, a.code) for a in record.errors]
    text = messages[0].content
    assert "\n" not in text and text.endswith(".") and "Something broke" not in text, text
    assert not re.search(r"/(tmp|home|work|root|usr|var)\b|\\", text), text
    return text


def notes_of(message: StoredMessage) -> str:
    fields = message.embeds[0].get("fields", []) if message.embeds else []
    return " ".join(f["value"] for f in fields if f["name"] == "Note")


async def stored_init(engine: Engine, message: StoredMessage) -> Image.Image:
    """The input image the message's job was run from, as the engine stored it."""
    job_id = int(message.embeds[0]["footer"]["text"].split()[1])
    async with engine.db.sessions() as session:
        job = await job_rows.get_job(session, job_id)
    assert job is not None and job.spec["init_image"]
    return Image.open(io.BytesIO(engine.files.read_bytes(job.spec["init_image"])))


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED, ids=[case.id for case in REFUSED])
async def test_a_bad_image_gets_one_sentence_and_stores_nothing(
    world: World, scratch: Path, case: Case
) -> None:
    files, jobs = stored_files(world.data_dir), await count_rows(world.engine, Job)
    assert await one_sentence(await send(world, case)) == case.sentence
    assert await count_rows(world.engine, Job) == jobs and stored_files(world.data_dir) == files
    assert list(scratch.iterdir()) == []


def _near(pixel: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


AcceptedCheck = Callable[[Engine, StoredMessage], Awaitable[None]]


def _colour_kept(expected: tuple[int, int, int]) -> AcceptedCheck:
    """The stored input is 8-bit RGB with the colour the person sent."""

    async def check(engine: Engine, message: StoredMessage) -> None:
        init = await stored_init(engine, message)
        assert init.mode == "RGB" and _near(init.getpixel((32, 32)), expected), init.getpixel((32, 32))

    return check


async def _stood_upright(engine: Engine, message: StoredMessage) -> None:
    init = await stored_init(engine, message)
    assert init.size == (64, 128)  # portrait, as the person saw it; not the sensor's 128×64
    top, bottom = init.getpixel((32, 16)), init.getpixel((32, 112))
    assert _near(top, (255, 0, 0), 40) and _near(bottom, (0, 0, 255), 40), (top, bottom)
    with Image.open(io.BytesIO(message.file_bytes(0))) as result:
        assert result.width < result.height, result.size  # the result is portrait too


CHECKS: dict[str, AcceptedCheck] = {
    "cmyk-jpeg": _colour_kept((255, 0, 0)),  # C0 M255 Y255 K0 is red
    "16-bit-png": _colour_kept((156, 156, 156)),  # 40000 of 65535
    "palette-png": _colour_kept((255, 0, 0)),
    "animated-gif": _colour_kept((255, 0, 0)),  # the first frame, not the blue second one
    "animated-png": _colour_kept((255, 0, 0)),
    "exif-rotated-jpeg": _stood_upright,
}


@pytest.mark.parametrize("case", ACCEPTED, ids=[case.id for case in ACCEPTED])
async def test_an_odd_but_clear_image_is_converted_and_runs(world: World, case: Case) -> None:
    jobs = await count_rows(world.engine, Job)
    message = await wait_job_message(world.double, await send(world, case))
    assert message.attachments, message.content
    for note in case.notes:
        assert note in notes_of(message), notes_of(message)
    assert await count_rows(world.engine, Job) == jobs + 1
    check = CHECKS.get(case.id)
    if check is not None:
        await check(world.engine, message)


async def test_after_every_bad_image_at_once_the_bot_still_serves(world: World) -> None:
    files, jobs = stored_files(world.data_dir), await count_rows(world.engine, Job)
    records = [await send(world, case) for case in REFUSED]  # all in flight together
    texts = await asyncio.gather(*(one_sentence(record) for record in records))
    assert texts == [case.sentence for case in REFUSED]
    assert stored_files(world.data_dir) == files and await count_rows(world.engine, Job) == jobs
    good = Case("good", "a plain PNG", "img2img", _img2img("photo.png", BLUE_PNG))
    message = await wait_job_message(world.double, await send(world, good))
    assert message.attachments and await count_rows(world.engine, Job) == jobs + 1

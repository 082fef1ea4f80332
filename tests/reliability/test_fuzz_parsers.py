"""Fuzzing the parsers a stranger's input reaches: the prompt language, PNG info, and upload decoding.

Hypothesis builds structured input (prompts from the webui's grammar with hostile numbers and characters,
PNGs with arbitrary text chunks and EXIF text, valid images with bytes flipped or cut) and checks that only
our user-facing errors (``storage.errors``) come out, each a sentence. Bounded (about 10 s in all) and
derandomized, so CI runs the same examples every time; raise ``FUZZ_EXAMPLES`` to search longer locally.
"""

from __future__ import annotations

import io
import json
import os
import struct
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from models.tokenizer import load_clip_tokenizer
from pipelines.followups import spec_from_parameters
from pipelines.images import load_image
from pipelines.inputs import JobInputs, prepare_inputs
from pipelines.jobs import LIMITS, JobKind, JobSpec, check_spec
from pipelines.pnginfo import ImageInfo, read_info
from pipelines.prompt_chunks import CHUNK_LENGTH, check_prompt, chunk_tokens, explain
from pipelines.prompts import extract_networks, parse_attention, prompt_schedule
from storage.errors import BotError, InvalidRequestError

SCALE = max(1, int(os.environ.get("FUZZ_EXAMPLES", "1")))  # a multiplier of the examples below


def fuzz(examples: int) -> settings:
    """Bounded, and the same examples on every CI run (a larger ``FUZZ_EXAMPLES`` explores anew).

    ``too_slow`` is suppressed: the recursive prompt and image strategies are slow to *draw*, by design.
    """
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _sentence(error: BotError) -> None:
    """What a user may be shown: one line ending in a full stop, well inside a Discord message."""
    text = str(error)
    assert text and text.endswith(".") and "\n" not in text and "Traceback" not in text, text
    assert len(text) <= 1000, len(text)


# --- the prompt language -----------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.sampled_from(["0.5", "1.3", "-5", "3", " 2 ", ".", "1.2.3", "1e308", "-1e308", "1e999", "inf", "nan",
                     "9" * 400, "1.", "+.5", "0", "150", "151", "-0", "٣", "²"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
)  # fmt: skip
WORDS = st.one_of(
    st.sampled_from(["cat", "a red circle", "BREAK", "BREAK BREAK", "break", "", " ", ",", "\n", "\\", "\\(",
                     "\\]", ":", "|", "(", ")", "[", "]", "<", ">", "<lora:", "\u200b", "\u202e", "\ufeff",
                     "שלום", "مرحبا", "😀", "\x00", "embedding"]),
    st.text(max_size=6),
)  # fmt: skip
NETWORK_KINDS = st.sampled_from(["lora", "lyco", "hypernet", "LORA", "foo", "", "l o"])


def _grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """One layer of the webui's prompt grammar around ``inner`` texts."""
    return st.one_of(
        inner.map(lambda t: f"({t})"),
        st.tuples(inner, NUMBERS).map(lambda p: f"({p[0]}:{p[1]})"),
        inner.map(lambda t: f"[{t}]"),
        st.tuples(inner, inner, NUMBERS).map(lambda p: f"[{p[0]}:{p[1]}:{p[2]}]"),
        st.tuples(inner, NUMBERS).map(lambda p: f"[{p[0]}:{p[1]}]"),
        st.tuples(inner, inner, NUMBERS).map(lambda p: f"[{p[0]}::{p[2]}]{p[1]}"),
        st.lists(inner, min_size=2, max_size=4).map(lambda parts: "[" + "|".join(parts) + "]"),
        st.tuples(NETWORK_KINDS, inner, NUMBERS).map(lambda p: f"<{p[0]}:{p[1]}:{p[2]}>"),
        st.tuples(inner, NUMBERS, NUMBERS).map(lambda p: f"<lora:{p[0]}:{p[1]}:unet={p[2]}>"),
        st.lists(inner, max_size=4).map(" ".join),
        st.tuples(inner, st.integers(1, 60)).map(lambda p: "(" * p[1] + p[0] + ")" * p[1]),
        st.tuples(inner, st.integers(1, 60)).map(lambda p: "BREAK " * p[1] + p[0]),
    )


PROMPTS = st.recursive(WORDS, _grow, max_leaves=24)


@cache
def _tokenizer() -> Any:
    return load_clip_tokenizer()


@fuzz(600)
@given(PROMPTS, st.integers(1, LIMITS.max_steps))
@example("([<lora:(\n:0.5):0.5:unet=0.5>])", 1)  # found: the refusal quoted the tag, newline and all
@example("a <lora:" + "x" * 3000 + ":abc>", 20)  # quoted whole, more than a Discord message holds
def test_the_prompt_language_raises_only_sentences(text: str, steps: int) -> None:
    try:
        stripped, networks = extract_networks(text)
        schedule = prompt_schedule(stripped, steps)
        runs = [parse_attention(part) for _, part in schedule]
        check_prompt(text, steps)
        spec = check_spec(JobSpec(prompt=text, negative_prompt=text, steps=steps, width=64, height=64))
    except InvalidRequestError as exc:
        _sentence(exc)
        return
    assert spec.prompt == text
    ends = [until for until, _ in schedule]
    assert ends[-1] == steps and ends == sorted(set(ends))
    assert all(abs(net.weight) < float("inf") for net in networks)
    for weighted in runs:  # what the text encoder gets: finite weights in whole 75-token windows
        assert all(abs(weight) <= 100 for _, weight in weighted)
        for chunk in chunk_tokens(weighted, _tokenizer()):
            assert len(chunk.tokens) == CHUNK_LENGTH and 0 <= chunk.length <= CHUNK_LENGTH


@fuzz(300)
@given(PROMPTS, st.integers(-5, 5000))
@example("a [cat|dog]", 2**53 - 1)  # found: one schedule entry per step, built before any check
def test_prompt_explain_raises_only_sentences(text: str, steps: int) -> None:
    """``/prompt explain`` and ``dreamcord explain-prompt``: any text, any step count a client may send."""
    try:
        report = explain(text, steps, _tokenizer())
    except InvalidRequestError as exc:
        _sentence(exc)
        return
    assert report["chunks"] >= 1 and report["schedule"][-1][0] == steps


# --- PNG info ----------------------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(["parameters", "prompt", "workflow", "invokeai_metadata", "sd-metadata", "Dream",
                     "Comment", "Description", "Software", "Source", "fooocus_scheme", "Title"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=255), min_size=1, max_size=20),
)  # fmt: skip
PARAM_KEYS = st.sampled_from(["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Model hash",
                              "Denoising strength", "Clip skip", "Lora hashes", "Hires upscale", "x",
                              "K-ey/1"])  # fmt: skip
PARAM_VALUES = st.one_of(
    NUMBERS,
    st.sampled_from(['"a, b: c"', '"unterminated', "64x64", "9" * 5000 + "x8", "²x8", "١٢٨x١٢٨", "0x0",
                     "-64x64", "Euler a", "DPM++ 2M Karras", "", "nan"]),
    st.text(max_size=12),
)  # fmt: skip


def _infotext(prompt: str, negative: str | None, pairs: list[tuple[str, str]]) -> str:
    """A1111 infotext: the prompt, maybe a negative prompt, and a settings line of ``key: value`` pairs."""
    negative_line = f"\nNegative prompt: {negative}" if negative is not None else ""
    return f"{prompt}{negative_line}\n" + ", ".join(f"{key}: {value}" for key, value in pairs)


A1111 = st.builds(
    _infotext,
    PROMPTS,
    st.one_of(st.none(), PROMPTS),
    st.lists(st.tuples(PARAM_KEYS, PARAM_VALUES), max_size=8),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NODE_IDS = st.sampled_from(["1", "2", "3", "10", "x"])
COMFY_INPUT = st.one_of(
    st.tuples(NODE_IDS, st.integers(0, 2)).map(list),  # a link (maybe to itself, maybe to nothing)
    st.text(max_size=10),
    st.integers(-(10**20), 10**20),
    st.floats(),
    JSON,
)
COMFY_GRAPH = st.dictionaries(
    NODE_IDS,
    st.fixed_dictionaries(
        {"class_type": st.sampled_from(["KSampler", "CLIPTextEncode", "CheckpointLoaderSimple", "X"])},
        optional={
            "inputs": st.dictionaries(
                st.sampled_from(["sampler_name", "steps", "cfg", "seed", "positive", "negative", "model",
                                 "latent_image", "text", "ckpt_name", "conditioning_1", "width", "height",
                                 "denoise", "noise_seed", "text_g"]),
                COMFY_INPUT,
                max_size=10,
            )
        },
    ),
    max_size=4,
).map(json.dumps)  # fmt: skip
VALUES = st.one_of(A1111, COMFY_GRAPH, JSON.map(json.dumps), st.text(max_size=40))
CHUNKS = st.lists(st.tuples(st.sampled_from(["tEXt", "zTXt", "iTXt"]), KEYS, VALUES), max_size=4)


def _png_with(chunks: list[tuple[str, str, str]], mode: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for kind, key, value in chunks:
        if kind == "iTXt":
            info.add_itxt(key, value, zip=len(value) % 2 == 0)
        else:
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                value = value.encode("latin-1", "replace").decode("latin-1")
            info.add_text(key, value, zip=kind == "zTXt")
    buffer = io.BytesIO()
    Image.new(mode, (16, 16)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _jpeg_with(comment: bytes, user_comment: bytes, strings: dict[int, str]) -> bytes:
    exif = Image.Exif()
    for tag, value in strings.items():
        exif[tag] = value
    exif.get_ifd(0x8769)[0x9286] = user_comment
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG", exif=exif, comment=comment)
    return buffer.getvalue()


def _read_and_remix(data: bytes) -> None:
    """``/pnginfo``: read the info, then build the "Remix with these" request from it."""
    try:
        info = read_info(data)
        spec = spec_from_parameters(info.prompt, info.negative_prompt, dict(info.parameters), user_id=1)
    except BotError as exc:
        _sentence(exc)
        return
    assert isinstance(info, ImageInfo) and isinstance(spec, JobSpec)


@fuzz(400)
@given(CHUNKS, st.sampled_from(["RGB", "RGBA", "L", "P"]))
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns about the odd chunks it skips
def test_png_text_chunks_raise_only_sentences(chunks: list[tuple[str, str, str]], mode: str) -> None:
    _read_and_remix(_png_with(chunks, mode))


EXIF_TEXT = st.one_of(
    A1111.map(lambda t: b"UNICODE\0" + t.encode("utf-16-be", "surrogatepass")),
    A1111.map(lambda t: b"UNICODE\0\xff\xfe" + t.encode("utf-16-le", "surrogatepass")),
    A1111.map(lambda t: b"ASCII\0\0\0" + t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=64),
)
EXIF_STRINGS = st.dictionaries(
    st.sampled_from([0x010E, 0x010F, 0x0110, 0x0131]),
    st.one_of(COMFY_GRAPH.map(lambda g: "prompt:" + g), st.text(max_size=20), st.just("Fooocus")),
    max_size=3,
)


@fuzz(300)
@given(A1111.map(lambda t: t.encode("utf-8", "surrogatepass")), EXIF_TEXT, EXIF_STRINGS)
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
def test_jpeg_exif_text_raises_only_sentences(
    comment: bytes, user_comment: bytes, strings: dict[int, str]
) -> None:
    try:
        data = _jpeg_with(comment[:60000], user_comment, strings)
    except (ValueError, struct.error, UnicodeEncodeError):  # Pillow cannot write that EXIF: not our input
        return
    _read_and_remix(data)


# --- image decoding of uploads ---------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    """Valid uploads of every format and mode we take, to flip bytes in and cut short."""
    rgb = Image.radial_gradient("L").resize((32, 24)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [rgb, rgb.rotate(90)]
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    return [
        _encode(rgb, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(Image.new("I;16", (24, 24), 40000), "PNG"),
        _encode(palette, "PNG"),
        _encode(rgb, "JPEG", exif=exif),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        _encode(rgb, "WEBP"),
        _encode(rgb, "BMP"),
    ]


SEEDS = _seeds()
MUTATIONS = st.tuples(
    st.integers(0, len(SEEDS) - 1),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=10),
    st.one_of(st.none(), st.floats(0, 1)),
)


def _mutated(seed: int, flips: list[tuple[float, int]], cut: float | None) -> bytes:
    data = bytearray(SEEDS[seed])
    for where, value in flips:
        data[int(where * len(data))] = value
    if cut is not None:
        del data[int(cut * len(data)) :]
    return bytes(data)


@fuzz(600)
@given(st.one_of(st.binary(max_size=2048), MUTATIONS.map(lambda m: _mutated(*m))), st.booleans())
@example(_mutated(6, [], 0.75), False)  # found: a GIF cut inside its second frame's header, IndexError
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # "Corrupt EXIF data", "Truncated File Read"
def test_uploaded_image_bytes_raise_only_sentences(data: bytes, keep_alpha: bool) -> None:
    try:
        loaded = load_image(data, keep_alpha=keep_alpha, role="image")
    except InvalidRequestError as exc:
        _sentence(exc)
        return
    assert loaded.image.mode in ("RGB", "RGBA") and min(loaded.image.size) >= 8


@fuzz(300)
@given(MUTATIONS.map(lambda m: _mutated(*m)), MUTATIONS.map(lambda m: _mutated(*m)))
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
def test_an_inpaint_upload_pair_raises_only_sentences(image: bytes, mask: bytes) -> None:
    """Image and mask together: the mask is read for its alpha or grey, resized, checked for white."""
    spec = JobSpec(prompt="a red circle", kind=JobKind.inpaint)
    try:
        prepared = prepare_inputs(spec, JobInputs(init=image, mask=mask), 64, LIMITS)
    except InvalidRequestError as exc:
        _sentence(exc)
        return
    assert set(prepared.files) == {"init", "mask"}
    with Image.open(io.BytesIO(prepared.files["mask"])) as stored_mask:
        with Image.open(io.BytesIO(prepared.files["init"])) as stored_init:
            assert stored_mask.size == stored_init.size


@pytest.mark.parametrize("size", ["9" * 5000 + "x8", "²x8"], ids=["5000-digit-size", "superscript-size"])
def test_pnginfo_remix_takes_any_size_text(size: str) -> None:
    """Found by the JPEG EXIF fuzz: an image's own Size text reaches ``int()``."""
    spec = spec_from_parameters("a cat", "", {"Size": size}, user_id=1)
    assert (spec.width, spec.height) == (0, 0)

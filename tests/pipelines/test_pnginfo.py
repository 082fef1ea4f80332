"""pipelines.pnginfo against real files from other tools, checked with sd-parsers (an independent reader)."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from sd_parsers import ParserManager
from sd_parsers.data import PromptInfo
from sd_parsers.extractors import Eagerness, _jpeg_usercomment, _png_stenographic_alpha

from pipelines.pnginfo import ImageInfo, format_parameters, parse_parameters, png_bytes, read_info
from storage.errors import InvalidRequestError

# sd-parsers' stealth reader calls Image.getdata(), deprecated in Pillow 13
pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata is deprecated:DeprecationWarning")

A1111_FILES = [
    "parsers__AUTOMATIC1111__automatic1111_cropped.png",
    "parsers__AUTOMATIC1111__automatic1111_cropped.jpg",
    "parsers__AUTOMATIC1111__automatic1111_stealth.png",
    # zTXt "parameters" after IDAT: sd-parsers' own tests expect it to parse
    "bad_images__text_after_idat.png",
]
OTHER_TOOL_FILES = [
    "parsers__ComfyUI__img2img_cropped.png",
    "parsers__ComfyUI__night_evening_day_morning_cropped.png",
    "parsers__ComfyUI__noisy_latents_3_subjects_cropped.png",
    "parsers__ComfyUI__unclip_2pass_cropped.png",
    "parsers__Fooocus__fooocus1_cropped.png",
    "parsers__InvokeAI__invokeai_dream1.png",
    "parsers__InvokeAI__invokeai_imeta1.png",
    "parsers__InvokeAI__invokeai_sdmeta1.png",
    "parsers__NovelAI__novelai1_cropped.png",
]


@pytest.fixture(scope="module")
def pnginfo_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pnginfo"


def sd_parse(source: Path | bytes) -> PromptInfo:
    """sd-parsers' reading, with the raw webui labels (no key normalisation) and the stealth check on."""
    # its EXIF and stealth extractors cache by id(image), which a new image can reuse: clear the caches
    _jpeg_usercomment._image_id = _png_stenographic_alpha._image_id = None
    image = source if isinstance(source, Path) else io.BytesIO(source)
    info = ParserManager(normalize_parameters=False).parse(image, eagerness=Eagerness.EAGER)
    assert info is not None
    return info


def chunk_types(data: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def stealth_png(text: str, size: tuple[int, int], *, compressed: bool) -> bytes:
    """Hide ``text`` the way the webui's stealth-pnginfo extension does: low alpha bit, column by column."""
    payload = gzip.compress(text.encode()) if compressed else text.encode()
    signature = b"stealth_pngcomp" if compressed else b"stealth_pnginfo"
    bits = "".join(f"{b:08b}" for b in signature) + f"{len(payload) * 8:032b}"
    bits += "".join(f"{b:08b}" for b in payload)
    image = Image.new("RGBA", size, (200, 120, 40, 255))
    pixels = image.load()
    assert pixels is not None and len(bits) <= size[0] * size[1]
    for i, bit in enumerate(bits):
        x, y = divmod(i, size[1])
        r, g, b, a = pixels[x, y]  # type: ignore[misc]
        pixels[x, y] = (r, g, b, (a & 0xFE) | int(bit))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def assert_matches_sd_parsers(ours: ImageInfo, theirs: PromptInfo) -> None:
    (sampler,) = theirs.samplers
    assert ours.tool == theirs.generator == "AUTOMATIC1111"
    assert ours.prompt == theirs.full_prompt
    assert ours.negative_prompt == theirs.full_negative_prompt
    assert ours.parameters["Sampler"] == sampler.name
    assert int(ours.parameters["Steps"]) == int(sampler.parameters["Steps"])
    assert int(ours.parameters["Seed"]) == int(sampler.parameters["Seed"])
    assert float(ours.parameters["CFG scale"]) == float(sampler.parameters["CFG scale"])
    assert ours.parameters["Size"] == theirs.metadata["Size"]


# --- real files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", A1111_FILES)
def test_a1111_files_read_like_sd_parsers(pnginfo_dir: Path, name: str) -> None:
    path = pnginfo_dir / name
    ours = read_info(path.read_bytes())
    assert_matches_sd_parsers(ours, sd_parse(path))
    assert ours.prompt and ours.raw.startswith(ours.prompt)


@pytest.mark.parametrize("name", OTHER_TOOL_FILES)
def test_other_tools_detected_and_read_like_sd_parsers(pnginfo_dir: Path, name: str) -> None:
    path = pnginfo_dir / name
    ours, theirs = read_info(path.read_bytes()), sd_parse(path)
    assert ours.tool == name.split("__")[1] == theirs.generator
    assert ours.raw
    # our fields come from the first sampler (lowest node id for ComfyUI)
    sampler = min(theirs.samplers, key=lambda s: int(s.sampler_id or 0))
    for attr, text in (("prompts", ours.prompt), ("negative_prompts", ours.negative_prompt)):
        parts = [p.value for p in getattr(sampler, attr)]
        if ours.tool == "ComfyUI":  # every text feeding the sampler, one per line, order aside
            assert all(part in text for part in parts)
            assert len(text) == sum(map(len, parts)) + max(len(parts) - 1, 0)
        else:
            assert text == ", ".join(parts)
    seed = sampler.parameters.get("seed", theirs.metadata.get("seed"))
    assert int(ours.parameters["Seed"]) == int(seed)
    assert ours.parameters["Sampler"] == sampler.name
    steps = sampler.parameters.get("steps", theirs.metadata.get("steps"))
    assert int(ours.parameters["Steps"]) == int(steps)


def test_comfyui_graph_details(pnginfo_dir: Path) -> None:
    info = read_info((pnginfo_dir / "parsers__ComfyUI__night_evening_day_morning_cropped.png").read_bytes())
    # KSampler "3": latent from EmptyLatentImage "5" (704x1280), model from CheckpointLoaderSimple "45",
    # positive prompt through a tree of ConditioningCombine nodes
    assert info.parameters["Size"] == "704x1280"
    assert info.parameters["CFG scale"] == "8.5"
    assert info.parameters["Model"] == "Anything-V3.0.ckpt"


def _png_with_text(chunks: dict[str, str]) -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.new("RGB", (2, 2)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_comfyui_sdxl_text_and_lora_chain() -> None:
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
        "9": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x"}},
        "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a castle", "text_l": "a castle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "fog", "clip": ["9", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
        "3": {"class_type": "KSamplerAdvanced", "inputs": {
            "noise_seed": 5, "steps": 30, "cfg": 6.0, "sampler_name": "euler", "scheduler": "karras",
            "model": ["9", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    }  # fmt: skip
    info = read_info(_png_with_text({"prompt": json.dumps(graph), "workflow": "{}"}))
    assert (info.tool, info.prompt, info.negative_prompt) == ("ComfyUI", "a castle", "fog")
    assert info.parameters == {
        "Steps": "30", "Sampler": "euler", "Schedule type": "karras", "CFG scale": "6", "Seed": "5",
        "Size": "1024x768", "Model": "sdxl.safetensors",
    }  # fmt: skip


def test_comfyui_webp_exif_strings() -> None:
    # ComfyUI's WebP saver: "prompt:{json}" in IFD0 Model (0x0110), "workflow:{json}" in Make (0x010F)
    graph = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "moss"}}, "2": {"inputs": {
        "seed": 1, "steps": 2, "cfg": 3, "sampler_name": "ddim", "positive": ["1", 0]}}}  # fmt: skip
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + json.dumps(graph)
    exif[0x010F] = "workflow:{}"
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="WEBP", exif=exif)
    info = read_info(out.getvalue())
    assert (info.tool, info.prompt, info.parameters["Sampler"]) == ("ComfyUI", "moss", "ddim")


def test_fooocus_a1111_scheme() -> None:
    text = "a boat\nNegative prompt: rain\nSteps: 30, Sampler: DPM++ 2M SDE, Seed: 4, Version: Fooocus v2.5"
    info = read_info(_png_with_text({"parameters": text, "fooocus_scheme": "a1111"}))
    assert (info.tool, info.prompt, info.negative_prompt, info.parameters["Seed"]) == (
        "Fooocus",
        "a boat",
        "rain",
        "4",
    )


def test_novelai_stealth_json() -> None:
    comment = {
        "steps": 28,
        "sampler": "k_euler",
        "seed": 7,
        "scale": 5.0,
        "uc": "lowres",
        "width": 832,
        "height": 1216,
    }
    chunks = {
        "Description": "1girl",
        "Software": "NovelAI",
        "Source": "NovelAI Diffusion V3",
        "Comment": comment,
    }
    info = read_info(stealth_png(json.dumps(chunks), (64, 64), compressed=True))
    assert (info.tool, info.prompt, info.negative_prompt) == ("NovelAI", "1girl", "lowres")
    assert info.parameters == {
        "Steps": "28", "Sampler": "k_euler", "CFG scale": "5", "Seed": "7", "Size": "832x1216",
        "Model": "NovelAI Diffusion V3",
    }  # fmt: skip


def test_empty_file_is_not_an_image(pnginfo_dir: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        read_info((pnginfo_dir / "bad_images__empty_file.png").read_bytes())
    assert str(caught.value) == "That file is not an image I can read; attach a PNG, JPEG or WebP."


@pytest.mark.parametrize("name", ["bad_images__empty_image.png", "bad_images__empty_image.jpg"])
def test_valid_image_without_metadata_gives_no_tool(pnginfo_dir: Path, name: str) -> None:
    # 1x1 images with only date chunks: readable, nothing generated them (sd-parsers agrees)
    assert ParserManager().parse(pnginfo_dir / name) is None
    assert read_info((pnginfo_dir / name).read_bytes()) == ImageInfo(tool=None)


# --- stealth and EXIF written the way the webui and its extension write them ------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_stealth_alpha_info(compressed: bool) -> None:
    text = format_parameters(
        "a red fox", "dogs", {"Steps": 12, "Sampler": "Euler", "CFG scale": 6.5, "Seed": 3, "Size": "37x53"}
    )
    data = stealth_png(text, (37, 53), compressed=compressed)  # not square: checks column-major order
    ours = read_info(data)
    assert (ours.tool, ours.raw, ours.prompt, ours.negative_prompt) == (
        "AUTOMATIC1111",
        text,
        "a red fox",
        "dogs",
    )
    if compressed:  # sd-parsers reads only the gzip form
        theirs = sd_parse(data)
        assert theirs.full_prompt == "a red fox" and theirs.samplers[0].parameters["Steps"] == "12"


def test_rgba_png_without_stealth_info() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (64, 64), (1, 2, 3, 128)).save(out, format="PNG")
    assert read_info(out.getvalue()).tool is None


def _exif_image(fmt: str, comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(out, format=fmt, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_unicode_as_piexif_writes_it(fmt: str) -> None:
    text = format_parameters(
        "ein Bär, 熊", "", {"Steps": 30, "Sampler": "DPM++ 2M", "CFG scale": 7, "Seed": 9, "Size": "8x8"}
    )
    data = _exif_image(fmt, b"UNICODE\0" + text.encode("utf-16-be"))
    ours = read_info(data)
    assert_matches_sd_parsers(ours, sd_parse(data))
    assert (ours.tool, ours.prompt, ours.parameters["Sampler"]) == (
        "AUTOMATIC1111",
        "ein Bär, 熊",
        "DPM++ 2M",
    )


@pytest.mark.parametrize(
    "comment",
    [
        b"UNICODE\0" + "Steps: 5, Sampler: Euler, Seed: 1".encode("utf-16-le"),
        b"ASCII\0\0\0Steps: 5, Sampler: Euler, Seed: 1",
    ],
)
def test_exif_user_comment_other_encodings(comment: bytes) -> None:
    info = read_info(_exif_image("JPEG", comment))
    assert info.tool == "AUTOMATIC1111" and info.parameters == {"Steps": "5", "Sampler": "Euler", "Seed": "1"}


def test_camera_style_user_comment_is_not_a1111() -> None:
    assert read_info(_exif_image("JPEG", b"ASCII\0\0\0taken on holiday")).tool is None


# --- writing ------------------------------------------------------------------------------------------

# fmt: off
ROUND_TRIP_CASES = [
    ("a photo of a cat", "",
     {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "512x512"}),
    ("masterpiece, 1girl, (blue hair:1.2)", "lowres, bad hands", {
        "Steps": 28, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 2**32 - 1,
        "Size": (768, 512), "Model hash": "15012c538f", "Model": "realisticVision", "Version": "v1.10.1",
        "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", "Hires upscaler": "4x+",
    }),
    ("日本の庭園, 桜 — ünïcödé", "ぼやけた",
     {"Steps": 8, "Sampler": "UniPC", "CFG scale": 3, "Seed": 0, "Size": "640x448"}),
    ("line one of the prompt\nline two: with a colon\n\nline four", "neg one\nneg two", {
        "Seed": 77, "CFG scale": 12.25, "Steps": 50, "Sampler": "DDIM", "Size": (1024, 1024), "Clip skip": 2,
        "Comment": "wait: what, really",
    }),
]
# fmt: on


@pytest.mark.parametrize(("prompt", "negative", "params"), ROUND_TRIP_CASES)
def test_round_trip_through_sd_parsers_and_ours(
    prompt: str, negative: str, params: dict[str, object]
) -> None:
    text = format_parameters(prompt, negative, params)
    data = png_bytes(Image.new("RGB", (16, 16), "gray"), text)
    width, height = (
        params["Size"] if isinstance(params["Size"], tuple) else map(int, str(params["Size"]).split("x"))
    )

    theirs = sd_parse(data)
    (sampler,) = theirs.samplers
    assert (theirs.full_prompt, theirs.full_negative_prompt) == (prompt, negative)
    assert sampler.name == params["Sampler"]
    assert int(sampler.parameters["Steps"]) == params["Steps"]
    assert int(sampler.parameters["Seed"]) == params["Seed"]
    assert float(sampler.parameters["CFG scale"]) == float(params["CFG scale"])  # type: ignore[arg-type]
    assert theirs.metadata["Size"] == f"{width}x{height}"

    ours = read_info(data)
    assert (ours.tool, ours.prompt, ours.negative_prompt, ours.raw) == (
        "AUTOMATIC1111",
        prompt,
        negative,
        text,
    )
    assert ours.parameters["Size"] == f"{width}x{height}"
    for key, value in params.items():
        if key != "Size":
            assert ours.parameters[key] == (str(value) if not isinstance(value, float) else f"{value:g}")
    expected_chunk = b"tEXt" if all(ord(c) < 256 for c in text) else b"iTXt"
    assert chunk_types(data) == [b"IHDR", expected_chunk, b"IDAT", b"IEND"]


def test_key_order_is_the_webuis() -> None:
    params = {
        "Hires upscaler": "Latent",  # extras keep their order, after the known keys and before Version/User
        "User": "ann",
        "Version": "v1.10.1",
        "Seed": 42,
        "Lora hashes": "detail: 0123abcd",
        "Clip skip": 2,
        "Model": "dreamshaper_8",
        "Size": (512, 768),
        "Denoising strength": 0.5,
        "Model hash": "879db523c3",
        "CFG scale": 7.5,
        "Schedule type": "Karras",
        "Sampler": "DPM++ 2M",
        "Steps": 25,
        "VAE": None,
        "ENSD": "",
    }
    expected = (
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        "Model hash: 879db523c3, Model: dreamshaper_8, Denoising strength: 0.5, Clip skip: 2, "
        'Hires upscaler: Latent, Lora hashes: "detail: 0123abcd", Version: v1.10.1, User: ann'
    )
    assert format_parameters("p", "", params) == "p\n" + expected


def test_format_details() -> None:
    # integral floats print like ints, the rest like Python; a value equal to its key prints alone (webui)
    assert (
        format_parameters("", "", {"CFG scale": 7.0, "Seed": 1, "Steps": 3})
        == "Steps: 3, CFG scale: 7, Seed: 1"
    )
    assert format_parameters("x", "", {"Tiling": "Tiling", "Steps": 1}) == "x\nSteps: 1, Tiling"
    assert (
        format_parameters("x", "n", {"A b": 'say "hi"\n'}) == 'x\nNegative prompt: n\nA b: "say \\"hi\\"\\n"'
    )
    with pytest.raises(ValueError):
        format_parameters("x", "", {"Bad: key": 1})


def test_parse_parameters_like_the_webui() -> None:
    # fewer than 3 pairs on the last line: it is part of the prompt
    assert parse_parameters("a cat\nSteps: 20, Seed: 1") == ("a cat\nSteps: 20, Seed: 1", "", {})
    text = 'a\nNegative prompt: b\nc\nSteps: 2, Sampler: Euler, Seed: 5, Note: "x, y: z", Empty: , Size: 8x8'
    assert parse_parameters(text) == (
        "a",
        "b\nc",
        {"Steps": "2", "Sampler": "Euler", "Seed": "5", "Note": "x, y: z", "Size": "8x8"},
    )


def test_png_bytes_writes_no_other_metadata() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    image.info["icc_profile"] = b"not really a profile"
    image.info["dpi"] = (300, 300)
    data = png_bytes(image, "")
    assert chunk_types(data) == [b"IHDR", b"IDAT", b"IEND"]
    assert read_info(data) == ImageInfo(tool=None)
    with Image.open(io.BytesIO(png_bytes(Image.new("CMYK", (4, 4)), "x"))) as reopened:
        assert reopened.mode == "RGB" and reopened.text == {"parameters": "x"}

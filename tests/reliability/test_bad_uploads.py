"""Bad uploads through the real path a Discord user takes: ``/lora upload`` (and ``/embedding``,
``/hypernet``, ``/vae upload``) on the real bot, talking to the local Discord double, with a real engine.

Every case must end in ONE ephemeral sentence (no path, no traceback, no "ref" id), store nothing (no new
``assets`` row, no new file in the content store, nothing left in its ``.tmp`` or in the upload scratch
folder), never run code from a pickle (the payloads' marker file never appears), and leave the bot serving:
after each refusal a valid upload (the shapes model's purple-circles LoRA) is accepted.

The cases are data: :data:`CASES`, one per kind of bad upload, each with the exact sentence the user sees.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from pipelines.engine import Engine
from storage.tables import Asset
from tests.cogs.conftest import PURPLE_LORA
from tests.cogs.replies import answer, count_rows, sentence
from tests.discord_double import DiscordDouble, Guild, InteractionRecord, User

# ---- payloads ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``exec``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _raw_pickle(marker: Path) -> bytes:
    """A plain pickle shaped like a webui embedding whose vectors are a code payload."""
    return pickle.dumps({"string_to_param": {"*": _RunsCode(marker)}, "name": "cute"}, protocol=2)


def _torch_zip_pickle(marker: Path) -> bytes:
    """torch's zip format (what ``torch.save`` writes today), a LoRA-like dict with a code payload."""
    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": _RunsCode(marker)}, buffer)
    return buffer.getvalue()


def _torch_legacy_pickle(marker: Path) -> bytes:
    """torch's legacy (pre-1.6) format, as old ``.ckpt`` files are: pickles back to back."""
    buffer = io.BytesIO()
    torch.save({"state_dict": _RunsCode(marker)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _safetensors(header: dict[str, Any] | bytes, data: bytes = b"", *, claimed: int | None = None) -> bytes:
    """A safetensors file from its parts: 8-byte little-endian header length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def _f32(begin: int, end: int, shape: list[int]) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def _purple_with(value: float) -> bytes:
    """The real purple-circles LoRA with one weight replaced by ``value`` (NaN, Inf)."""
    tensors = load_file(PURPLE_LORA)
    first = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = value
    return save_safetensors(tensors, metadata={"ss_network_module": "networks.lora"})


def _sdxl_lora(_: Path) -> bytes:
    """A kohya LoRA for SDXL's second text encoder (OpenCLIP-G, 1280 wide): a layer only SDXL has."""
    gen = torch.Generator().manual_seed(0)
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    return save_safetensors(
        {
            f"{name}.lora_down.weight": torch.randn(4, 1280, generator=gen) * 0.1,
            f"{name}.lora_up.weight": torch.randn(1280, 4, generator=gen) * 0.1,
            f"{name}.alpha": torch.tensor(4.0),
        }
    )


def _embedding_512(_: Path) -> bytes:
    """A webui safetensors embedding whose vectors are 512 wide (SD 1.5: 768, the shapes model: 64)."""
    return save_safetensors({"emb_params": torch.randn(2, 512, generator=torch.Generator().manual_seed(1))})


def _hypernet(
    layer_structure: list[float], built_for: tuple[int, ...] = (1, 2, 1), activation: object = "linear"
) -> bytes:
    """A webui hypernetwork for context width 320 whose weights are those of ``built_for``."""
    gen = torch.Generator().manual_seed(2)
    width = 320
    sizes = [width * m for m in built_for]
    state = {}
    for i in range(len(sizes) - 1):
        state[f"linear.{i}.weight"] = torch.randn(sizes[i + 1], sizes[i], generator=gen) * 0.01
        state[f"linear.{i}.bias"] = torch.zeros(sizes[i + 1])
    buffer = io.BytesIO()
    torch.save(
        {
            width: [state, {k: v.clone() for k, v in state.items()}],
            "layer_structure": layer_structure,
            "activation_func": activation,
            "is_layer_norm": False,
            "use_dropout": False,
            "name": "bad",
            "step": 10,
        },
        buffer,
    )
    return buffer.getvalue()


@functools.cache
def _zip_bomb() -> bytes:
    """A torch-style zip (``archive/data.pkl``...) of about 0.6 MB whose pickle inflates to 128 MiB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("archive/version", "3\n")
        with archive.open("archive/data.pkl", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(128):
                member.write(chunk)
    return buffer.getvalue()


# ---- the cases --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad upload.

    Attributes:
        id: Stable kebab-case id (the pytest id, and the row in RELIABILITY.md).
        kind: What was tried, for people.
        make: Builds the attachment's bytes (given the marker file a code payload would create).
        expected: The exact sentence the user must see.
        command: ``lora``, ``embedding``, ``hypernet`` or ``vae``.
        filename: The attachment's file name.
        name: The ``name`` option, when given.
        size: What the attachment object claims the file weighs (Discord's ``size``), when it lies.
        early: Refused before the attachment is downloaded (and answered at once, not deferred).
        first: A valid file the user uploads, under ``name``, before the bad one.
        quota_mb: The storage each member may keep, in MB, when not the default.
    """

    id: str
    kind: str
    make: Callable[[Path], bytes]
    expected: str
    command: str = "lora"
    filename: str = "cute_lora.safetensors"
    name: str | None = None
    size: int | None = None
    early: bool = False
    first: bool = False
    quota_mb: int | None = None


_CODE = "This file contains code, not just weights; upload a .safetensors file instead."
_NOT_SAFETENSORS = "This weights file is not a valid safetensors file: {}."
_NAME_CHARS = "Asset names may only use letters, digits, '_', '-' and '.', starting with a letter or digit."
_BOMB = "This file unpacks to far more data than it holds (a zip bomb?); upload the plain weights file."
_BROKEN = "This weights file contains NaN or infinite values; it is broken, so upload a working copy."


def _purple(_: Path) -> bytes:
    return PURPLE_LORA.read_bytes()


CASES = [
    Case("pickle-in-pt", "webui-style .pt embedding: a plain pickle with a code payload (/embedding)",
         _raw_pickle, _CODE, command="embedding", filename="cute.pt"),
    Case("pickle-in-bin", "torch-zip .bin LoRA with a code payload", _torch_zip_pickle, _CODE,
         filename="cute_lora.bin"),
    Case("pickle-in-ckpt", "legacy torch .ckpt with a code payload (/vae)", _torch_legacy_pickle, _CODE,
         command="vae", filename="cute_vae.ckpt"),
    Case("pickle-in-pt-hypernet", "torch-zip .pt with a code payload (/hypernet)", _torch_zip_pickle, _CODE,
         command="hypernet", filename="cute_hn.pt"),
    Case("pickle-named-safetensors", "a code-payload pickle renamed .safetensors", _raw_pickle, _CODE),
    Case("header-past-end", "safetensors header length pointing past the end of the file",
         lambda _: _safetensors({"w": _f32(0, 16, [4])}, bytes(16), claimed=4096),
         _NOT_SAFETENSORS.format("its header runs past the end of the file")),
    Case("header-100mb", "safetensors header length claiming 100 MB",
         lambda _: _safetensors({"w": _f32(0, 16, [4])}, bytes(16), claimed=100 * 2**20),
         _NOT_SAFETENSORS.format("its header is larger than allowed")),
    Case("header-not-json", "safetensors header that is not JSON",
         lambda _: _safetensors(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]', bytes(16)),
         _NOT_SAFETENSORS.format("its header is not readable JSON")),
    Case("overlapping-offsets", "two safetensors tensors sharing bytes",
         lambda _: _safetensors({"a": _f32(0, 16, [4]), "b": _f32(8, 24, [4])}, bytes(24)),
         _NOT_SAFETENSORS.format("two tensors share the same bytes")),
    Case("out-of-range-offsets", "a safetensors tensor whose offsets lie past the data",
         lambda _: _safetensors({"a": _f32(0, 16, [4]), "b": _f32(4096, 4112, [4])}, bytes(16)),
         _NOT_SAFETENSORS.format("a tensor's data lies outside the file")),
    Case("unknown-dtype", "a safetensors tensor of an unknown dtype",
         lambda _: _safetensors({"a": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
         _NOT_SAFETENSORS.format("a tensor has an unsupported data type")),
    Case("nan-tensor", "the real purple-circles LoRA with one NaN weight", lambda _: _purple_with(math.nan),
         _BROKEN),
    Case("inf-tensor", "the real purple-circles LoRA with one +Inf weight", lambda _: _purple_with(math.inf),
         _BROKEN),
    Case("zip-bomb-pt", "torch-zip .pt of 0.6 MB whose pickle inflates to 128 MiB", lambda _: _zip_bomb(),
         _BOMB, filename="bomb.pt"),
    Case("zip-bomb-named-safetensors", "the same zip bomb named .safetensors", lambda _: _zip_bomb(), _BOMB),
    Case("empty-file", "a 0-byte file", lambda _: b"",
         "This file is empty; upload the adapter file itself."),
    Case("upload-2gb", "attachment whose size says 2 GiB (refused before download)", _purple,
         "That file is 2048 MB; LoRAs may be at most 1024 MB.", size=2 * 2**30, early=True),
    Case("upload-5gb", "attachment whose size says 5 GiB, over the user's 2 GiB quota too", _purple,
         "That file is 5120 MB; LoRAs may be at most 1024 MB.", size=5 * 2**30, early=True),
    Case("bigger-than-quota", "attachment whose size says 10 MB where each member may keep 5 MB", _purple,
         "That file is 10 MB, larger than all of your 5 MB of storage; upload a smaller file.",
         size=10 * 2**20, quota_mb=5, early=True),
    Case("lora-wrong-family", "an SDXL LoRA (OpenCLIP-G text-encoder layer) on an SD 1.5 server", _sdxl_lora,
         "This LoRA is for SDXL; this server's model is SD 1.5."),
    Case("lora-as-vae", "a valid LoRA uploaded with /vae upload", _purple,
         "This file is not a VAE we recognise; check that you picked the right kind.", command="vae"),
    Case("embedding-wrong-width", "an embedding of 512-wide vectors (/embedding)", _embedding_512,
         "This embedding file is not usable: its vectors are 512 wide, which fits none of this server's "
         "models.", command="embedding", filename="wide.safetensors"),
    Case("hypernet-layers-mismatch", "a hypernetwork saying [1, 3, 1] with weights for [1, 2, 1]",
         lambda _: _hypernet([1, 3, 1]),
         "This hypernetwork file is not usable: a layer for width 320 has the wrong shape.",
         command="hypernet", filename="hn.pt"),
    Case("hypernet-structure-ends", "a hypernetwork whose layer structure is [2, 1]",
         lambda _: _hypernet([2, 1], built_for=(2, 1)),
         "This hypernetwork file is not usable: its layer structure must start and end with 1.",
         command="hypernet", filename="hn.pt"),
    Case("hypernet-activation-tensor", "a hypernetwork whose activation function is a tensor, not a name",
         lambda _: _hypernet([1, 2, 1], activation=torch.ones(3)),
         "This hypernetwork file is not usable: its activation function is not a name.",
         command="hypernet", filename="hn.pt"),
    Case("truncated-pickle", "a 3-byte .pt: a pickle cut short", lambda _: b"\x80\x02\x86",
         "This weights file is damaged and could not be read; upload it again.", filename="cut.pt"),
    Case("empty-tensor-huge-sizes", "a safetensors tensor of shape [0, 2**63] (0 bytes, absurd sizes)",
         lambda _: _safetensors({"w": {"dtype": "BF16", "shape": [0, 2**63], "data_offsets": [0, 0]}}),
         _NOT_SAFETENSORS.format("a tensor shape has too many or too large sizes")),
    Case("duplicate-name", "a second LoRA under a name the user already has", lambda _: _purple_with(0.5),
         "You already have a LoRA called purple; pick another name or delete the old one first.",
         name="purple", first=True, early=True),
    Case("name-path-separators", "name option ../../bot.py", _purple, _NAME_CHARS, name="../../bot.py",
         early=True),
    Case("name-backslashes", "name option ..\\..\\bot.py", _purple, _NAME_CHARS, name="..\\..\\bot.py",
         early=True),
    Case("name-control-chars", "name option with NUL, BEL and a newline", _purple, _NAME_CHARS,
         name="evil\x00na\x07me\nx", early=True),
    Case("name-200-chars", "a 200-character name", _purple,
         "Asset names can be at most 64 characters; choose a shorter one.", name="a" * 200, early=True),
    Case("name-only-emoji", "a name of only emoji", _purple, _NAME_CHARS, name="\U0001f3a8\U0001f525\u2728",
         early=True),
]  # fmt: skip


# ---- helpers ----------------------------------------------------------------------------------------------


def _store_files(engine: Engine) -> set[str]:
    """Every file under the content store, its ``.tmp`` included (relative paths)."""
    root = engine.files.root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def _upload(
    double: DiscordDouble, user: User, guild: Guild, case: Case, data: bytes, *, name: str | None
) -> tuple[InteractionRecord, dict[str, Any]]:
    attachment = double.add_attachment(case.filename, data)
    if case.size is not None:
        attachment["size"] = case.size  # what Discord says the file weighs, before anyone downloads it
    options = {"name": name} if name is not None else {}
    record = await double.slash(
        user,
        guild,
        None,
        case.command,
        subcommand="upload",
        options=options,
        attachments={"file": attachment},
    )
    return record, attachment


def _fetched(double: DiscordDouble, attachment: dict[str, Any]) -> bool:
    return ("GET", attachment["url"].removeprefix(double.url)) in double.requests



# ---- the tests --------------------------------------------------------------------------------------------


def test_case_ids_are_unique_and_kebab() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)


@pytest.mark.parametrize("make", [_raw_pickle, _torch_zip_pickle, _torch_legacy_pickle])
def test_the_payloads_are_live(tmp_path: Path, make: Callable[[Path], bytes]) -> None:
    """Loaded the unsafe way, each payload does run its code (so the marker test below means something)."""
    marker = tmp_path / "ran"
    data = make(marker)
    if make is _raw_pickle:
        pickle.loads(data)
    else:
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_upload(
    double: DiscordDouble,
    bot: Any,
    engine: Engine,
    guild: Guild,
    alice: User,
    scratch: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: Case,
) -> None:
    marker = tmp_path / "payload-ran"
    if case.quota_mb is not None:
        engine.settings = engine.settings.model_copy(update={"user_storage_mb": case.quota_mb})
    if case.first:
        first, _ = await _upload(double, alice, guild, case, _purple(marker), name=case.name)
        assert (await answer(first)).startswith(f"Added {case.name}: LoRA"), case.id
    rows, files = await count_rows(engine, Asset), _store_files(engine)

    record, attachment = await _upload(double, alice, guild, case, case.make(marker), name=case.name)
    text = await sentence(record)
    assert text == case.expected, f"{case.id}: {text!r}"
    assert not re.search(r"\bref\b", text), f"{case.id}: an internal error id: {text!r}"
    assert not marker.exists(), f"{case.id}: the pickled code ran"
    assert await count_rows(engine, Asset) == rows, f"{case.id}: an assets row was written"
    assert _store_files(engine) == files, f"{case.id}: the file store changed"
    assert list(scratch.iterdir()) == [], f"{case.id}: the upload's scratch files were left behind"
    if case.early:
        assert not _fetched(double, attachment), f"{case.id}: downloaded before refusing"
        assert (await record.response()).callback_type == 4, f"{case.id}: deferred before refusing"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"{case.id}: logged as an error: {[r.getMessage() for r in errors]}"

    # the bot keeps serving: a valid upload right after is accepted and stored
    after = Case("after", "", _purple, "", filename="purple-circles.safetensors")
    ok, _ = await _upload(double, alice, guild, after, _purple(marker), name="still-works")
    assert (await answer(ok)).startswith("Added still-works: LoRA, kohya format, SD 1.5"), case.id
    assert await count_rows(engine, Asset) == rows + 1
    assert not marker.exists()
    double.assert_clean()

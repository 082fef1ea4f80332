"""Asset commands through Discord, end to end: the real dreamcord bot (real discord.py client)
against the local Discord double, a real engine on the shapes model and real adapter files.

Covers ``cogs/assets.py``: ``/lora`` and ``/embedding`` in depth (upload, import, list, info, share,
rename, delete, name autocomplete); ``/hypernet`` and ``/vae`` are the same group class. The history commands
are in test_history_e2e.py.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors
from sqlalchemy import select

from pipelines.engine import Engine
from pipelines.settings import Settings
from storage.tables import Asset, Job
from tests.cogs.conftest import wait_job_message
from tests.cogs.replies import answer, count_rows, sentence, slash
from tests.discord_double import DiscordDouble, Guild, InteractionRecord, User

ROOT = Path(__file__).resolve().parents[2]
LORA = ROOT / "models" / "shapes" / "loras" / "purple-circles.safetensors"
TAG = "<lora:purple-circles:1>"


# ---- helpers ------------------------------------------------------------------------------------------


async def _assets(engine: Engine) -> list[Asset]:
    async with engine.db.sessions() as session:
        return list(await session.scalars(select(Asset).order_by(Asset.id)))


def _stored_files(engine: Engine) -> set[str]:
    return set(engine.files.iter_hashes())


async def _upload(
    double: DiscordDouble,
    user: User,
    guild: Guild,
    filename: str,
    data: bytes,
    *,
    command: str = "lora",
    size: int | None = None,
    **options: Any,
) -> tuple[InteractionRecord, dict[str, Any]]:
    attachment = double.add_attachment(filename, data)
    if size is not None:
        attachment["size"] = size  # what Discord says the file weighs, before anyone downloads it
    record = await double.slash(
        user, guild, None, command, subcommand="upload", options=options, attachments={"file": attachment}
    )
    return record, attachment


def _lora_hash(data: bytes) -> str:
    """The webui's LoRA hash: sha256 of a safetensors file's bytes after its header, 12 digits."""
    (header_length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


class _RunsCode:
    """Unpickling this calls exec(): it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _code_payload(marker: Path, *, torch_zip: bool) -> bytes:
    if not torch_zip:
        return pickle.dumps({"string_to_param": _RunsCode(marker)}, protocol=2)
    buffer = io.BytesIO()
    torch.save({"state_dict": _RunsCode(marker)}, buffer)
    return buffer.getvalue()



@pytest.fixture
async def capped_engine(tmp_path: Path, tiny_models: Path) -> AsyncIterator[Engine]:
    settings = Settings(
        data_dir=tmp_path / "capped", builtin_models_dir=tiny_models, asset_max_mb={"lora": 1}
    )
    async with Engine(settings, recover=True) as eng:
        yield eng


# ---- /lora upload, then using it ------------------------------------------------------------------------


async def test_lora_upload_use_refuse_share(
    double: DiscordDouble,
    bot: Any,
    engine: Engine,
    guild: Guild,
    alice: User,
    bob: User,
    scratch: Path,
) -> None:
    data = LORA.read_bytes()
    record, _ = await _upload(double, alice, guild, "purple-circles.safetensors", data)
    assert (await record.response()).callback_type == 5  # deferred: the check may take a while
    text = await answer(record)
    assert "LoRA" in text and "kohya" in text and "shapes" in text and "rank 8" in text, text
    assert "<lora:purple-circles:0.8>" in text and "private" in text
    (row,) = await _assets(engine)
    assert (row.name, row.owner_id, row.guild_id, row.visibility.value) == (
        "purple-circles",
        alice.id,
        guild.id,
        "private",
    )
    assert row.sha256 == hashlib.sha256(data).hexdigest() and row.size == len(data)
    assert engine.files.read_bytes(row.sha256) == data
    assert list(scratch.iterdir()) == []  # the upload's scratch copy is gone

    made = await slash(double, alice, guild, "imagine", prompt=f"a red circle {TAG}", steps=6)
    message = await wait_job_message(double, made)
    assert message.attachments, message.content
    with Image.open(io.BytesIO(message.file_bytes(0))) as png:
        parameters = png.info["parameters"]
    assert f"purple-circles: {_lora_hash(data)}" in parameters, parameters  # the webui's "Lora hashes"
    assert await count_rows(engine, Job) == 1

    refused = await slash(double, bob, guild, "imagine", prompt=f"a red circle {TAG}", steps=6)
    text = await answer(refused)
    assert text.startswith("There is no LoRA called purple-circles that you can use here"), text
    assert "\n" not in text
    assert await count_rows(engine, Job) == 1

    shared = await slash(double, alice, guild, "lora", "share", name="purple-circles")
    assert await sentence(shared) == "`purple-circles` is now shared with this server."
    assert (await _assets(engine))[0].visibility.value == "guild"
    used = await slash(double, bob, guild, "imagine", prompt=f"a red circle {TAG}", steps=6)
    message = await wait_job_message(double, used)
    assert message.attachments, message.content
    assert await count_rows(engine, Job) == 2
    double.assert_clean()


# ---- refused uploads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "make", "expected"),
    [
        ("x.safetensors", lambda _: bytes(range(256)) * 64, "not a weights file we can read"),
        (
            "x.safetensors",
            lambda _: save_safetensors({"weight": torch.zeros(4, 4)}),
            "not a LoRA we recognise",
        ),
        ("evil.pt", lambda marker: _code_payload(marker, torch_zip=False), "contains code"),
        ("evil.pt", lambda marker: _code_payload(marker, torch_zip=True), "contains code"),
    ],
    ids=["random-bytes", "plain-safetensors", "pickle-code", "torch-zip-code"],
)
async def test_refused_upload_is_one_sentence_and_stores_nothing(
    double: DiscordDouble,
    bot: Any,
    engine: Engine,
    guild: Guild,
    alice: User,
    scratch: Path,
    tmp_path: Path,
    filename: str,
    make: Callable[[Path], bytes],
    expected: str,
) -> None:
    marker = tmp_path / "code-ran"
    data = make(marker)
    if filename == "evil.pt":  # the payload is real: unpickling it elsewhere does run its code
        probe = tmp_path / "probe-ran"
        pickle.loads(pickle.dumps(_RunsCode(probe)))
        assert probe.exists()
    files_before = _stored_files(engine)
    record, _ = await _upload(double, alice, guild, filename, data)
    text = await sentence(record)
    assert expected in text, text
    assert not marker.exists()  # the pickle was never run
    assert await count_rows(engine, Asset) == 0
    assert _stored_files(engine) == files_before
    assert list(scratch.iterdir()) == []
    double.assert_clean()


async def test_upload_over_the_cap_is_refused_before_download(
    double: DiscordDouble, running_bot: Any, capped_engine: Engine, guild: Guild, alice: User
) -> None:
    async with running_bot(capped_engine):
        record, attachment = await _upload(
            double, alice, guild, "huge.safetensors", LORA.read_bytes(), size=5 * 2**20
        )
        assert await sentence(record) == "That file is 5 MB; LoRAs may be at most 1 MB."
        assert (await record.response()).callback_type == 4  # answered at once, never deferred
    path = attachment["url"].removeprefix(double.url)
    assert path.startswith("/attachments/") and ("GET", path) not in double.requests
    assert await count_rows(capped_engine, Asset) == 0 and _stored_files(capped_engine) == set()
    double.assert_clean()


async def test_sd15_embedding_on_the_shapes_server(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, fixtures_dir: Path
) -> None:
    data = (fixtures_dir / "embeddings" / "bad-artist.pt").read_bytes()
    record, _ = await _upload(double, alice, guild, "bad-artist.pt", data, command="embedding")
    text = await answer(record)
    # bad-artist.pt: an A1111 embedding of 2 vectors of width 768 (see ../shared/fixtures/README.md)
    assert text.startswith("Added bad-artist: embedding, webui-pt format, SD 1.5, 2 vectors."), text
    assert "does not fit" in text and "shapes" in text, text
    (row,) = await _assets(engine)
    assert (row.kind.value, row.family, row.trigger) == ("embedding", "sd15", "bad-artist")
    # As in the webui, an embedding that does not fit the job's model is plain text there: the job runs
    # without it (which is why the upload answer warns).
    used = await slash(double, alice, guild, "imagine", prompt="bad-artist, a red circle", steps=4)
    message = await wait_job_message(double, used)
    assert message.attachments, message.content
    async with engine.db.sessions() as session:
        (job,) = list(await session.scalars(select(Job)))
    assert job.spec["prompt"] == "bad-artist, a red circle" and not job.spec.get("adapters")
    double.assert_clean()


# ---- list, info, autocomplete, rename, delete ------------------------------------------------------------


async def _choices(double: DiscordDouble, user: User, guild: Guild, sub: str, typed: str = "") -> list[str]:
    record = await double.autocomplete(
        user, guild, None, "lora", "name", subcommand=sub, options={"name": typed}
    )
    await record.response()
    assert record.choices is not None
    assert all(c["name"] == c["value"] for c in record.choices)
    return [c["value"] for c in record.choices]


async def test_list_info_autocomplete_rename_delete(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User, bob: User
) -> None:
    data = LORA.read_bytes()
    empty = await slash(double, bob, guild, "lora", "list")
    assert await sentence(empty) == "There are no LoRAs you can use here yet; `/lora upload` one."
    for user, name in ((alice, None), (bob, "bobs-circles")):
        options = {"name": name} if name else {}
        record, _ = await _upload(double, user, guild, "purple-circles.safetensors", data, **options)
        assert (await answer(record)).startswith("Added ")
    rows = await _assets(engine)
    assert [(r.name, r.owner_id) for r in rows] == [("purple-circles", alice.id), ("bobs-circles", bob.id)]
    assert len({r.sha256 for r in rows}) == 1 and len(_stored_files(engine)) == 1  # one copy of the bytes

    listed = await slash(double, alice, guild, "lora", "list")
    assert await answer(listed) == "`purple-circles` — SD 1.5, shapes model, kohya · private"
    info = await slash(double, alice, guild, "lora", "info", name="PURPLE-circles")
    size_mb = f"{len(data) / 2**20:.1f}"
    assert await sentence(info) == (
        f"`purple-circles`: a LoRA, kohya format, SD 1.5, shapes model, {size_mb} MB, "
        f"hash {_lora_hash(data)}, private. Use it with `<lora:purple-circles:0.8>`."
    )
    hidden = await slash(double, bob, guild, "lora", "info", name="purple-circles")
    assert await sentence(hidden) == "There is no LoRA called purple-circles that you can use here."

    # name autocomplete: only what the user may use; share/rename/delete offer only their own
    assert await _choices(double, alice, guild, "info") == ["purple-circles"]
    assert await _choices(double, bob, guild, "info") == ["bobs-circles"]
    shared = await slash(double, bob, guild, "lora", "share", name="bobs-circles")
    assert await sentence(shared) == "`bobs-circles` is now shared with this server."
    assert await _choices(double, alice, guild, "info") == ["bobs-circles", "purple-circles"]
    assert await _choices(double, alice, guild, "info", "PURP") == ["purple-circles"]
    assert await _choices(double, alice, guild, "delete") == ["purple-circles"]
    assert await _choices(double, alice, guild, "rename") == ["purple-circles"]
    listed = await slash(double, alice, guild, "lora", "list")
    assert await answer(listed) == (
        "`bobs-circles` — SD 1.5, shapes model, kohya (shared)\n"
        "`purple-circles` — SD 1.5, shapes model, kohya · private"
    )

    renamed = await slash(double, alice, guild, "lora", "rename", name="purple-circles", new_name="violet")
    assert await sentence(renamed) == "Renamed to `violet`; use `<lora:violet:0.8>`."
    clash = await slash(double, alice, guild, "lora", "rename", name="violet", new_name="bad name")
    assert "letters, digits" in await sentence(clash)
    assert [r.name for r in await _assets(engine)] == ["violet", "bobs-circles"]

    not_hers = await slash(double, alice, guild, "lora", "delete", name="bobs-circles")
    assert await sentence(not_hers) == "You have no LoRA called bobs-circles; see the list of your LoRAs."
    deleted = await slash(double, alice, guild, "lora", "delete", name="violet")
    assert await sentence(deleted) == "Deleted your LoRA `violet`."
    assert [r.name for r in await _assets(engine)] == ["bobs-circles"]
    assert engine.files.exists(rows[1].sha256)  # bob's row still uses the bytes
    deleted = await slash(double, bob, guild, "lora", "delete", name="bobs-circles")
    assert await sentence(deleted) == "Deleted your LoRA `bobs-circles`."
    assert await count_rows(engine, Asset) == 0 and _stored_files(engine) == set()
    double.assert_clean()


async def test_upload_with_a_bad_name_is_refused_before_download(
    double: DiscordDouble, bot: Any, engine: Engine, guild: Guild, alice: User
) -> None:
    record, attachment = await _upload(
        double, alice, guild, "purple-circles.safetensors", LORA.read_bytes(), name="my lora"
    )
    assert "letters, digits" in await sentence(record)
    assert ("GET", attachment["url"].removeprefix(double.url)) not in double.requests
    assert await count_rows(engine, Asset) == 0
    double.assert_clean()


async def test_every_kind_has_its_group(double: DiscordDouble, bot: Any, guild: Guild, alice: User) -> None:
    synced = {c["name"]: c for c in double.commands()}
    for command, label in (
        ("lora", "LoRA"),
        ("embedding", "embedding"),
        ("hypernet", "hypernetwork"),
        ("vae", "VAE"),
    ):
        subcommands = {o["name"]: o for o in synced[command]["options"]}
        assert set(subcommands) == {"upload", "import", "list", "info", "share", "rename", "delete"}
        name_options = [
            o
            for sub in ("info", "share", "rename", "delete")
            for o in subcommands[sub]["options"]
            if o["name"] == "name"
        ]
        assert len(name_options) == 4 and all(o.get("autocomplete") for o in name_options)
        record = await slash(double, alice, guild, command, "list")
        assert (
            await sentence(record) == f"There are no {label}s you can use here yet; `/{command} upload` one."
        )
    double.assert_clean()


# ---- /lora import ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://example.com/x",
            "Only https:// links can be imported; paste the file's https:// download link.",
        ),
        (
            "https://example.com/x.safetensors",
            "Imports from example.com are not allowed; the bot admin can add it to the import allow-list.",
        ),
    ],
    ids=["http", "not-allow-listed"],
)
async def test_import_refuses_bad_links_without_network(
    double: DiscordDouble,
    bot: Any,
    engine: Engine,
    guild: Guild,
    alice: User,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    expected: str,
) -> None:
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost"):
            looked_up.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    record = await slash(double, alice, guild, "lora", "import", url=url)
    assert await answer(record) == expected
    assert (await record.response()).callback_type == 4  # refused at once, nothing fetched
    assert looked_up == []
    assert not (engine.settings.data_dir / "imports").exists()
    assert await count_rows(engine, Asset) == 0
    double.assert_clean()

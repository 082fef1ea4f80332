"""URL imports an attacker would try (issue 8, SSRF): one sentence, nothing fetched that should not be,
nothing stored, no secret repeated.

Two tables. IMPORTER_CASES drive :func:`pipelines.url_import.fetch_to_file` against the local HTTPS server
and test resolver of tests/pipelines/test_url_import.py (its helpers are imported, not copied) plus a few
routes that file has no use for (redirects to IP literals and other ports, headers that never come, a gzip
bomb). BOT_CASES go through ``/lora import`` on the Discord double: the links the bot can be shown to refuse
offline, including host names that the system resolver answers with private addresses.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import pytest
import pytest_asyncio
from aiohttp import web
from discord.ext import commands

from bot import build_bot
from pipelines import url_import as ui
from pipelines.engine import Engine
from pipelines.settings import Settings
from storage.tables import Asset
from tests.cogs.conftest import PURPLE_LORA, upload_lora
from tests.cogs.replies import answer, count_rows, sentence, slash
from tests.discord_double import DiscordDouble, Guild, User
from tests.pipelines.test_url_import import (
    CDN,
    EVIL,
    HF,
    SECRET,
    FakeHub,
    MapResolver,
    Server,
    certificate,
    local_resolver,
    refused,
    server,
    serving_hub,
)

__all__ = ["certificate", "server"]  # fixtures of tests/pipelines/test_url_import.py, used here

HEADER_SECRET = "civitai-api-key-7f3e9b"  # an admin's import token sent as Authorization
BOMB_LIMIT = 1_000_000


# ---- extra routes ----------------------------------------------------------------------------------------


class MoreHub(FakeHub):
    """FakeHub with the answers tests/pipelines has no route for."""

    def add_routes(self, app: web.Application) -> None:
        super().add_routes(app)
        app.router.add_get("/to-metadata", self.to_metadata)
        app.router.add_get("/to-mapped", self.to_mapped)
        app.router.add_get("/to-port", self.to_port)
        app.router.add_get("/slow-headers", self.slow_headers)
        app.router.add_get("/gzip-bomb", self.gzip_bomb)
        app.router.add_get("/json", self.json)

    async def to_metadata(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("https://169.254.169.254/latest/meta-data/iam/security-credentials/")

    async def to_mapped(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://[::ffff:127.0.0.1]:{self.port}/blob")

    async def to_port(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://{HF}:22/blob")

    async def slow_headers(self, request: web.Request) -> web.Response:
        await asyncio.wait_for(self.stop.wait(), 10)  # accepts the request, answers nothing
        return web.Response(body=b"late")

    async def gzip_bomb(self, request: web.Request) -> web.Response:
        """30 KB on the wire, 30 MB once aiohttp inflates it (the client asked for identity)."""
        body = gzip.compress(bytes(30 * 2**20), compresslevel=9)
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
        return web.Response(body=body, headers=headers)

    async def json(self, request: web.Request) -> web.Response:
        return web.json_response({"files": []})


@pytest.fixture
async def more_server(certificate: tuple[Path, Path]) -> AsyncIterator[Server]:
    """The test_url_import server, with MoreHub's routes too."""
    async with serving_hub(MoreHub(asyncio.Event()), certificate) as started:
        yield started


# ---- the importer ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UrlCase:
    """``url``: a path on the test server, or a whole link; ``addresses``: the test resolver's table
    (None: names resolve to the server); ``overrides``: fetch_to_file options."""

    id: str
    url: str
    expected: str
    addresses: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


PRIVATE_HOST = ui.PRIVATE.format(host="civitai.com")
CIVITAI = "https://civitai.com/api/download/models/1"

IMPORTER_CASES = [
    UrlCase("http", "http://huggingface.co/x.safetensors", ui.NOT_HTTPS),
    UrlCase("not-allow-listed", "https://example.com/x.safetensors",
            ui.NOT_ALLOWED.format(host="example.com")),
    UrlCase("lookalike-host", f"https://{HF}.{EVIL}/x", ui.NOT_ALLOWED.format(host=f"{HF}.{EVIL}")),
    UrlCase("ip-literal-metadata", "https://169.254.169.254/latest/meta-data/", ui.IP_HOST),
    UrlCase("ip-literal-v4-mapped", "https://[::ffff:169.254.169.254]/x", ui.IP_HOST),
    UrlCase("redirect-off-list", "/off-list", ui.REDIRECT_REFUSED),
    UrlCase("redirect-to-http", "/downgrade", ui.REDIRECT_REFUSED),
    UrlCase("redirect-to-metadata-ip", "/to-metadata", ui.REDIRECT_REFUSED),
    UrlCase("redirect-to-v4-mapped-ip", "/to-mapped", ui.REDIRECT_REFUSED),
    UrlCase("redirect-to-other-port", "/to-port", ui.REDIRECT_REFUSED),
    UrlCase(
        "redirect-to-name-resolving-private", "/resolve/model.safetensors",
        ui.PRIVATE.format(host="the site the link redirects to"),
        addresses={HF: ["127.0.0.1"], CDN: ["169.254.169.254"]},
    ),
    UrlCase("resolves-127", CIVITAI, PRIVATE_HOST, addresses={"civitai.com": ["127.0.0.1"]},
            overrides={"allow_loopback": False}),
    UrlCase("resolves-10", CIVITAI, PRIVATE_HOST, addresses={"civitai.com": ["10.1.2.3"]}),
    UrlCase("resolves-metadata", CIVITAI, PRIVATE_HOST, addresses={"civitai.com": ["169.254.169.254"]}),
    UrlCase("resolves-v6-loopback", CIVITAI, PRIVATE_HOST, addresses={"civitai.com": ["::1"]},
            overrides={"allow_loopback": False}),
    UrlCase("resolves-v4-mapped", CIVITAI, PRIVATE_HOST, addresses={"civitai.com": ["::ffff:10.0.0.1"]}),
    UrlCase("resolves-mixed", CIVITAI, PRIVATE_HOST,
            addresses={"civitai.com": ["93.184.215.14", "10.0.0.1"]}),
    UrlCase("slow-headers", "/slow-headers", ui.STALLED.format(seconds=0.3),
            overrides={"idle_timeout_s": 0.3}),
    UrlCase("stalled-body", "/stall", ui.STALLED.format(seconds=0.3), overrides={"idle_timeout_s": 0.3}),
    UrlCase("slow-endless-body", "/trickle", ui.TOO_SLOW.format(seconds=0.8),
            overrides={"idle_timeout_s": 0.5, "timeout_s": 0.8}),
    UrlCase("content-type-html", "/login", ui.HTML_PAGE),
    UrlCase("content-type-text", "/text", ui.BAD_TYPE.format(kind="text/plain")),
    UrlCase("content-type-json", "/json", ui.BAD_TYPE.format(kind="application/json")),
    UrlCase("declared-over-cap", "/declared-big", ui.TOO_LARGE.format(limit="1000 bytes"),
            overrides={"max_bytes": 1000, "idle_timeout_s": 0.5}),
    UrlCase("streamed-over-cap", "/streamed-big", ui.TOO_LARGE.format(limit="1000 bytes"),
            overrides={"max_bytes": 1000}),
    UrlCase("gzip-bomb", "/gzip-bomb", ui.TOO_LARGE.format(limit="977 KiB"),
            overrides={"max_bytes": BOMB_LIMIT}),
]  # fmt: skip


@pytest.mark.parametrize("case", IMPORTER_CASES, ids=[c.id for c in IMPORTER_CASES])
async def test_importer_refuses(
    more_server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: UrlCase
) -> None:
    url = case.url if "://" in case.url else more_server.url(case.url)
    resolver = MapResolver(dict(case.addresses)) if case.addresses is not None else local_resolver()
    headers = {"Authorization": f"Bearer {HEADER_SECRET}"}
    options = {"resolver": resolver, "headers": headers, **case.overrides}
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    start = loop.time()
    message = await refused(more_server, f"{url}?token={SECRET}", tmp_path, **options)  # nothing left in tmp
    assert message == case.expected
    assert loop.time() - start < 5
    for secret in (SECRET, HEADER_SECRET):  # the link's token and the admin's are never repeated or logged
        assert secret not in message and secret not in caplog.text
    if case.id.startswith("redirect-"):  # only the link itself was fetched: never where it pointed
        assert [path for _, path, _ in more_server.seen] == [case.url], more_server.seen


async def test_the_importer_still_imports_after_refusals(server: Server, tmp_path: Path) -> None:
    """The same options as the cases, a good link: the file arrives (so the refusals above are not the
    importer failing at everything)."""
    from tests.pipelines.test_url_import import BODY, fetch

    for case in ("/off-list", "/stall"):
        await refused(server, server.url(case), tmp_path, idle_timeout_s=0.3)
    got = await fetch(server, server.url("/resolve/model.safetensors"), tmp_path)
    assert got.path.read_bytes() == BODY


# ---- through the bot: /lora import -----------------------------------------------------------------------

#: host names the admin put on the allow-list, and what the (patched) system resolver answers for them
FAKE_DNS = {
    "metadata.internal": "169.254.169.254",
    "intranet.example": "10.0.0.7",
    "mapped.example": "::ffff:127.0.0.1",
}


@dataclass
class BotWorld:
    double: DiscordDouble
    engine: Engine
    bot: commands.Bot
    guild: Guild
    alice: User


def _fake_getaddrinfo(real: Any) -> Any:
    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        address = FAKE_DNS.get(str(host))
        if address is None:
            return real(host, port, *args, **kwargs)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr: tuple[Any, ...] = (address, int(port or 443))
        if family == socket.AF_INET6:
            sockaddr += (0, 0)
        return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]

    return getaddrinfo


@pytest.fixture(scope="module")
def fake_dns() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", _fake_getaddrinfo(socket.getaddrinfo))
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot_world(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: Path, fake_dns: None
) -> AsyncIterator[BotWorld]:
    data_dir = tmp_path_factory.mktemp("bad-imports") / "data"
    settings = Settings(
        data_dir=data_dir,
        builtin_models_dir=tiny_models,
        import_hosts=[*ui.DEFAULT_ALLOWED_HOSTS, "localhost", *FAKE_DNS],
        import_timeout_s=5,
    )
    async with DiscordDouble() as double:
        with double.install(discord):
            guild = double.add_guild("Dream Guild")
            alice = double.add_user("alice", guild)
            async with Engine(settings, recover=True) as engine:
                async with double.run_bot(build_bot(engine, guild_ready_timeout=0.05)) as started:
                    await started.tree.sync()
                    yield BotWorld(double, engine, started, guild, alice)
                    double.assert_clean()


BOT_CASES = [
    ("bot-http", "http://huggingface.co/x.safetensors", ui.NOT_HTTPS),
    ("bot-not-allow-listed", "https://example.com/x.safetensors", ui.NOT_ALLOWED.format(host="example.com")),
    ("bot-ip-loopback", "https://127.0.0.1/x.safetensors", ui.IP_HOST),
    ("bot-ip-private", "https://10.0.0.1/x.safetensors", ui.IP_HOST),
    ("bot-ip-metadata", "https://169.254.169.254/latest/meta-data/", ui.IP_HOST),
    ("bot-ip-v6-loopback", "https://[::1]/x.safetensors", ui.IP_HOST),
    ("bot-ip-v4-mapped", "https://[::ffff:127.0.0.1]/x.safetensors", ui.IP_HOST),
    ("bot-ip-decimal", "https://2130706433/x", ui.NOT_ALLOWED.format(host="2130706433")),
    ("bot-userinfo", "https://user:hunter2@huggingface.co/x", ui.USERINFO),
    ("bot-port", "https://huggingface.co:8443/x", ui.BAD_PORT),
    ("bot-resolves-loopback", "https://localhost/x.safetensors", ui.PRIVATE.format(host="localhost")),
    ("bot-resolves-metadata", "https://metadata.internal/latest/meta-data/",
     ui.PRIVATE.format(host="metadata.internal")),
    ("bot-resolves-10", "https://intranet.example/x.safetensors",
     ui.PRIVATE.format(host="intranet.example")),
    ("bot-resolves-v4-mapped", "https://mapped.example/x.safetensors",
     ui.PRIVATE.format(host="mapped.example")),
]  # fmt: skip


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("url", "expected"), [c[1:] for c in BOT_CASES], ids=[c[0] for c in BOT_CASES])
async def test_lora_import_refuses(bot_world: BotWorld, url: str, expected: str) -> None:
    w = bot_world
    assets, files = await count_rows(w.engine, Asset), set(w.engine.files.iter_hashes())
    record = await slash(w.double, w.alice, w.guild, "lora", "import", url=url)
    text = await sentence(record)
    assert text == expected
    assert "hunter2" not in text
    assert await count_rows(w.engine, Asset) == assets and set(w.engine.files.iter_hashes()) == files
    imports = w.engine.settings.data_dir / "imports"
    assert not imports.exists() or list(imports.iterdir()) == []  # no partial download left


@pytest.mark.asyncio(loop_scope="module")
async def test_the_bot_keeps_serving_after_bad_imports(bot_world: BotWorld) -> None:
    w = bot_world
    record = await upload_lora(w.double, w.alice, w.guild, PURPLE_LORA.read_bytes(), "after.safetensors")
    assert (await answer(record)).startswith("Added after: LoRA")

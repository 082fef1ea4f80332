"""No token or secret in logs, error messages or anything the bot posts (issue 8, "Security").

The bot token, a database password and an import token are set to distinctive values; a whole bot session
on the Discord double (login, a job, admin commands, an unexpected error with its ref id, a failed URL
import) runs with every logger at DEBUG, and none of the values may appear in any log record (message,
arguments, traceback) or in any message or embed the bot sent. The settings' own ``repr``/``str``/dumps
hide them too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.ext import commands

from bot import build_bot
from pipelines.engine import Engine
from pipelines.settings import Settings
from pipelines.url_import import import_headers
from tests.cogs.conftest import wait_job_message
from tests.cogs.replies import answer, sentence, slash
from tests.discord_double import DiscordDouble, Guild

BOT_TOKEN = "MTEzNzQ.distinctive-bot-token.Zx9QvW3kLp"
DB_PASSWORD = "db-pass-Qm8r2Tz"
IMPORT_TOKEN = "civitai-key-4d1f0c9e"
URL_TOKEN = "hf_usertoken_81KzQ"  # a token a user pastes inside a link
SECRETS = (BOT_TOKEN, DB_PASSWORD, IMPORT_TOKEN)


def _settings(tmp_path: Path, tiny_models: Path, **extra: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        builtin_models_dir=tiny_models,
        discord_token=BOT_TOKEN,
        import_tokens={"civitai.com": IMPORT_TOKEN},
        import_hosts=["huggingface.co", "civitai.com", "localhost"],
        preview_every=0,
        **extra,
    )


def test_settings_never_show_their_secrets(
    tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql+asyncpg://dreamcord:{DB_PASSWORD}@db.internal/dreamcord"
    settings = _settings(tmp_path, tiny_models, database_url=url)
    shown = [repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, (secret, text)
    assert "**********" in repr(settings)
    # ... while the code that needs them still gets them
    assert settings.resolved_database_url == url
    assert settings.discord_token is not None and settings.discord_token.get_secret_value() == BOT_TOKEN
    # from the environment as well (an admin's usual way)
    monkeypatch.setenv("DREAMCORD_DISCORD_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("DREAMCORD_IMPORT_TOKENS", json.dumps({"civitai.com": IMPORT_TOKEN}))
    monkeypatch.setenv("DREAMCORD_DATABASE_URL", url)
    from_env = Settings(data_dir=tmp_path / "env")
    assert from_env.resolved_database_url == url
    assert import_headers("https://civitai.com/x", from_env.import_tokens) == {
        "Authorization": f"Bearer {IMPORT_TOKEN}"
    }
    for secret in SECRETS:
        assert secret not in repr(from_env) and secret not in from_env.model_dump_json()


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://civitai.com/api/download/models/1", True),
        ("https://CivitAI.com./api/download/models/1", True),
        ("https://huggingface.co/x/resolve/main/y.safetensors", False),
        ("https://civitai.com.evil.example/x", False),
        ("https://b2.civitai.com/x", False),  # a subdomain (where downloads redirect) gets no token
        ("http://civitai.com/x", False),
        ("not a link", False),
    ],
    ids=["host", "host-case-and-dot", "other-host", "lookalike", "subdomain", "http", "garbage"],
)
def test_an_import_token_goes_to_its_own_host_only(url: str, sent: bool) -> None:
    headers = import_headers(url, {"civitai.com": IMPORT_TOKEN, "unused.example": ""})
    assert headers == ({"Authorization": f"Bearer {IMPORT_TOKEN}"} if sent else {})


@pytest.fixture
def every_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of every logger at DEBUG (root, discord, aiohttp and ours)."""
    loggers = [logging.getLogger(name) for name in ("", "discord", "aiohttp", "pipelines", "cogs", "storage")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.fixture
async def token_double() -> AsyncIterator[DiscordDouble]:
    async with DiscordDouble(token=BOT_TOKEN) as started:
        with started.install(discord):
            yield started


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Each record as text: the formatted message, its raw arguments and any traceback."""
    texts = []
    formatter = logging.Formatter()
    for record in caplog.records:
        texts.append(formatter.format(record) + repr(record.args) + repr(record.__dict__.get("exc_text")))
    return texts


async def _session(double: DiscordDouble, bot: commands.Bot, engine: Engine, guild: Guild) -> dict[str, str]:
    """A bot session touching every path that logs: returns what the user saw, by step."""
    alice = double.add_user("alice", guild)
    admin = double.add_user("admin", guild, permissions=["manage_guild"])
    seen: dict[str, str] = {}
    made = await slash(double, alice, guild, "imagine", prompt="a red circle", steps=2)
    seen["job"] = json.dumps((await wait_job_message(double, made)).data)
    for sub in ("stats", "models"):
        seen[f"admin {sub}"] = await answer(await slash(double, admin, guild, "admin", sub))
    seen["settings show"] = await answer(await slash(double, admin, guild, "settings", "show"))
    # a failed URL import, the user's own token in the link (localhost is on this test's allow-list)
    seen["import"] = await sentence(
        await slash(double, alice, guild, "lora", "import", url=f"https://localhost/x?token={URL_TOKEN}")
    )

    # an unexpected error whose text carries the settings (as careless code might): a ref id, the
    # traceback in the log, the secrets hidden there too
    def broken(user_id: int) -> list[Any]:
        raise RuntimeError(f"queue index corrupt; settings were {engine.settings!r}")

    engine.queue.jobs_of = broken  # type: ignore[method-assign]
    seen["error"] = await answer(await slash(double, alice, guild, "queue"))
    return seen


async def test_a_bot_session_never_shows_a_secret(
    token_double: DiscordDouble, every_log: pytest.LogCaptureFixture, tmp_path: Path, tiny_models: Path
) -> None:
    double = token_double
    guild = double.add_guild("Dream Guild")
    settings = _settings(tmp_path, tiny_models)
    async with Engine(settings, recover=True) as engine:
        bot = build_bot(engine, guild_ready_timeout=0.05)
        async with double.run_bot(bot) as started:  # logs in with BOT_TOKEN
            await started.tree.sync()
            seen = await _session(double, started, engine, guild)
    assert ("GET", "/api/v10/users/@me") in double.requests  # the token was really used to log in
    ref = re.fullmatch(r"Something broke on our side \(ref ([0-9a-f]{6})\); .*", seen["error"])
    assert ref is not None, seen["error"]
    logged = _logged(every_log)
    assert any(
        f"ref {ref[1]}" in text and "RuntimeError" in text for text in logged
    )  # the traceback is there
    assert (
        seen["import"]
        == "The address of localhost is on a private or local network, which imports may not use."
    )
    posted = [json.dumps(message.data) for message in double.messages.values()]
    assert len(posted) >= 6 and len(logged) > 100, (len(posted), len(logged))
    for secret in SECRETS:
        assert not [text for text in logged if secret in text], secret
        assert not [text for text in posted if secret in text], secret
        assert not [text for text in seen.values() if secret in text], secret
        assert not [path for _, path in double.requests if secret in path], secret
    ours = [r for r in every_log.records if not r.name.startswith(("discord", "aiohttp"))]
    assert not [r for r in ours if URL_TOKEN in r.getMessage()]  # the link's token: not in our own logs
    assert URL_TOKEN not in seen["import"]
    double.assert_clean()


def test_the_run_commands_log_filter_masks_tokens_discord_py_logs_at_debug() -> None:
    """discord.py logs interaction payloads and webhook routes at DEBUG: `dreamcord run` masks them."""
    import io
    import logging

    from cogs.log_secrets import install_secret_filter

    stream = io.StringIO()
    logger = logging.getLogger("dreamcord-secret-filter-test")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        install_secret_filter("BOT.TOKEN.sekrit", logger=logger)
        interaction_token = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5OmFiY2RlZg-xyz_1"
        logger.debug("POST /webhooks/1234/%s?wait=1 with %s", interaction_token, "{}")
        logger.debug("received %s", {"t": "INTERACTION_CREATE", "d": {"token": interaction_token, "id": "9"}})
        logger.debug("POST /interactions/99/%s/callback", interaction_token)
        logger.info("login with BOT.TOKEN.sekrit failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert interaction_token not in text and "sekrit" not in text, text
    assert text.count("***") == 4 and "/webhooks/1234/***?wait=1" in text

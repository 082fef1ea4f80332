"""The dreamcord bot in a process of its own, talking to a Discord double that runs in the test's process.

``python -m tests.reliability.bot_process`` with, besides the usual ``DREAMCORD_*`` settings (data dir,
models, ``DREAMCORD_DISCORD_TOKEN``):

- ``DREAMCORD_DOUBLE_API``: what ``discord.http.Route.BASE`` must be (``DiscordDouble.base_url``);
- ``DREAMCORD_DOUBLE_GATEWAY``: what ``DiscordWebSocket.DEFAULT_GATEWAY`` must be (``gateway_url``).

It does what ``dreamcord run`` does — the engine with ``recover=True`` on the data dir, then
``build_bot`` — and prints ``ready`` on stdout at each ``on_ready``. SIGTERM closes it cleanly (exit 0);
SIGKILL is what the restart test sends. :func:`start_bot_process` starts one from a test.

Held (``held=True``): the process only imports its modules (the ~10 s a cold start spends), prints
``held`` and waits for a line on stdin before it opens or reads anything; :func:`release` lets it go on.
A test starts the next process that way while the current one still runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

__all__ = ["API_ENV", "GATEWAY_ENV", "HOLD_ENV", "bot_env", "main", "release", "start_bot_process"]

API_ENV = "DREAMCORD_DOUBLE_API"
GATEWAY_ENV = "DREAMCORD_DOUBLE_GATEWAY"
HOLD_ENV = "DREAMCORD_DOUBLE_HOLD"
REPO_ROOT = Path(__file__).resolve().parents[2]


def bot_env(api: str, gateway: str, token: str, data_dir: Path, models_dir: Path) -> dict[str, str]:
    """The environment of a bot process serving ``data_dir`` against the double at ``api``/``gateway``."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        API_ENV: api,
        GATEWAY_ENV: gateway,
        "DREAMCORD_DISCORD_TOKEN": token,
        "DREAMCORD_DATA_DIR": str(data_dir),
        "DREAMCORD_BUILTIN_MODELS_DIR": str(models_dir),
        "DREAMCORD_CONFIG": str(data_dir / "none.toml"),  # no config file: only these settings
        "DREAMCORD_PREVIEW_EVERY": "0",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


async def start_bot_process(
    env: dict[str, str], log_path: Path, *, held: bool = False, timeout: float = 120
) -> asyncio.subprocess.Process:
    """Start the bot process and return once it printed ``ready`` (held: ``held``); its log goes to
    ``log_path``."""
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.reliability.bot_process",
            env={**env, HOLD_ENV: "1"} if held else env,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
        )
    await _expect(process, b"held" if held else b"ready", log_path, timeout)
    return process


async def release(process: asyncio.subprocess.Process, log_path: Path, *, timeout: float = 120) -> None:
    """Let a held bot process go on; returns once it is ready."""
    assert process.stdin is not None
    process.stdin.write(b"go\n")
    await process.stdin.drain()
    await _expect(process, b"ready", log_path, timeout)


async def _expect(process: asyncio.subprocess.Process, word: bytes, log_path: Path, timeout: float) -> None:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
    except (TimeoutError, asyncio.CancelledError):  # never leave a process behind
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise
    if line.strip() != word:
        await process.wait()
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the bot process did not print {word!r} (exit {process.returncode}):\n{tail}")


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


async def _run() -> None:
    import discord
    import yarl

    from bot import build_bot
    from pipelines.engine import Engine
    from pipelines.settings import load_settings

    discord.http.Route.BASE = os.environ[API_ENV]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ[GATEWAY_ENV])
    settings = load_settings()
    assert settings.discord_token is not None, "DREAMCORD_DISCORD_TOKEN is not set"
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Engine(settings, recover=True) as engine:
        bot = build_bot(engine, guild_ready_timeout=0.05)

        async def announce() -> None:
            _say("ready")

        bot.add_listener(announce, "on_ready")
        async with bot:
            running = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
            await bot.close()
            stopping.cancel()
            await running


def _preload() -> None:
    """Import what the bot needs (nothing is opened or read: a held process has no state yet)."""
    import bot  # noqa: F401
    import cogs.admin  # noqa: F401
    import cogs.assets  # noqa: F401
    import cogs.generate  # noqa: F401
    import cogs.history  # noqa: F401
    import cogs.redelivery  # noqa: F401
    import pipelines.engine  # noqa: F401


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get(HOLD_ENV):
        _preload()
        _say("held")
        if sys.stdin.readline().strip() != "go":
            return  # the test gave up on this process
    asyncio.run(_run())


if __name__ == "__main__":
    main()

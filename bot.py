"""dreamcord's entry point: settings -> engine -> discord bot with its cogs; also the ``dreamcord`` CLI.

``python bot.py`` (or ``dreamcord run``) starts the bot. Every other ``dreamcord`` command lives in
:mod:`pipelines.cli`, which knows nothing of Discord.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from pipelines.cli import main as cli_main
from pipelines.settings import Settings, load_settings

if TYPE_CHECKING:
    from discord.ext import commands

    from pipelines.engine import Engine

__all__ = ["NO_TOKEN", "build_bot", "cli", "main", "run_bot"]

log = logging.getLogger("dreamcord")

NO_TOKEN = (
    "No Discord bot token is set. Create an application at https://discord.com/developers/applications, "
    "open Bot → Reset Token, copy it, then run again with DREAMCORD_DISCORD_TOKEN=<token> "
    '(or discord_token = "..." in dreamcord.toml).'
)


def build_bot(engine: Engine) -> commands.Bot:
    """The discord.py bot with dreamcord's cogs; commands are synced only on request, never at start."""
    import discord
    from discord.ext import commands

    from cogs.generate import Generate

    intents = discord.Intents.default()

    class DreamcordBot(commands.Bot):
        async def setup_hook(self) -> None:
            await self.add_cog(Generate(self, engine))

    return DreamcordBot(command_prefix=commands.when_mentioned, intents=intents, help_command=None)


async def run_bot(settings: Settings) -> None:
    from pipelines.engine import Engine

    if settings.discord_token is None:
        raise SystemExit(2)
    async with Engine(settings, recover=True) as engine:  # the bot serves the queue: it takes over leftovers
        bot = build_bot(engine)
        async with bot:
            await bot.start(settings.discord_token.get_secret_value())


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.discord_token is None:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_bot(settings))
    return 0


def cli() -> None:
    """The ``dreamcord`` console script."""
    sys.exit(cli_main(extra={"run": ("start the Discord bot", _cmd_run)}))


def main() -> None:
    """``python bot.py``: start the bot."""
    sys.exit(cli_main(["run"], extra={"run": ("start the Discord bot", _cmd_run)}))


if __name__ == "__main__":
    main()

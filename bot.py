"""dreamcord's entry point: settings -> engine -> discord bot with its cogs; also the ``dreamcord`` CLI.

``python bot.py`` (or ``dreamcord run``) starts the bot. Every other ``dreamcord`` command lives in
:mod:`pipelines.cli`, which knows nothing of Discord.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from pipelines.cli import Command
from pipelines.cli import main as cli_main
from pipelines.settings import Settings, load_settings

if TYPE_CHECKING:
    from discord.ext import commands

    from pipelines.engine import Engine

__all__ = ["NO_TOKEN", "build_bot", "cli", "command_payloads", "main", "run_bot", "sync_commands"]

log = logging.getLogger("dreamcord")

NO_TOKEN = (
    "No Discord bot token is set. Create an application at https://discord.com/developers/applications, "
    "open Bot → Reset Token, copy it, then run again with DREAMCORD_DISCORD_TOKEN=<token> "
    '(or discord_token = "..." in dreamcord.toml).'
)


def build_bot(engine: Engine, **options: Any) -> commands.Bot:
    """The discord.py bot with dreamcord's cogs; commands are synced only on request, never at start.

    At its first ``on_ready`` it posts the outcomes a previous (killed) process never delivered.
    """
    import discord
    from discord.ext import commands

    from cogs.admin import Admin
    from cogs.assets import Assets
    from cogs.common import install_error_handler
    from cogs.generate import Generate
    from cogs.history import History
    from cogs.job_buttons import JobButton
    from cogs.redelivery import Redelivery

    intents = discord.Intents.default()

    class DreamcordBot(commands.Bot):
        async def setup_hook(self) -> None:
            install_error_handler(self.tree)
            self.add_dynamic_items(JobButton)  # buttons keep working after a restart
            await self.add_cog(Generate(self, engine))
            await self.add_cog(Assets(self, engine))
            await self.add_cog(History(self, engine))
            await self.add_cog(Admin(self, engine))
            await self.add_cog(Redelivery(self, engine))  # what a killed predecessor still owed

    return DreamcordBot(command_prefix=commands.when_mentioned, intents=intents, help_command=None, **options)


async def run_bot(settings: Settings) -> None:
    from pipelines.engine import Engine

    if settings.discord_token is None:
        raise SystemExit(2)
    async with Engine(settings, recover=True) as engine:  # the bot serves the queue: it takes over leftovers
        bot = build_bot(engine)
        async with bot:
            await bot.start(settings.discord_token.get_secret_value())


async def command_payloads(settings: Settings) -> list[dict[str, Any]]:
    """The exact application-command payloads the bot sends to Discord's bulk-overwrite endpoint."""
    from pipelines.engine import Engine

    bot = build_bot(Engine(settings, start_worker=False))  # not opened: nothing is read or run
    await bot.setup_hook()
    return [command.to_dict(bot.tree) for command in bot.tree.get_commands()]


async def sync_commands(settings: Settings) -> int:
    """Log in, register the slash commands with Discord once, log out; returns how many were synced."""
    from pipelines.engine import Engine

    if settings.discord_token is None:
        raise SystemExit(2)
    bot = build_bot(Engine(settings, start_worker=False))
    async with bot:
        await bot.login(settings.discord_token.get_secret_value())  # runs setup_hook: the cogs are added
        return len(await bot.tree.sync())


def _cmd_sync(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.discord_token is None:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    count = asyncio.run(sync_commands(settings))
    print(json.dumps({"synced": count}) if args.json else f"Registered {count} slash commands with Discord.")
    return 0


def _cmd_commands(args: argparse.Namespace) -> int:
    payloads = asyncio.run(command_payloads(load_settings()))
    print(json.dumps(payloads, indent=2 if not args.json else None))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.discord_token is None:
        print(NO_TOKEN, file=sys.stderr)
        return 2
    from cogs.log_secrets import install_secret_filter

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_secret_filter(settings.discord_token.get_secret_value())
    asyncio.run(run_bot(settings))
    return 0


EXTRA_COMMANDS: dict[str, tuple[str, Command]] = {
    "run": ("start the Discord bot", _cmd_run),
    "commands": ("print the slash-command payloads the bot registers with Discord (JSON)", _cmd_commands),
    "sync-commands": ("register the slash commands with Discord (first start, after updates)", _cmd_sync),
}


def cli() -> None:
    """The ``dreamcord`` console script."""
    sys.exit(cli_main(extra=EXTRA_COMMANDS))


def main() -> None:
    """``python bot.py``: start the bot."""
    sys.exit(cli_main(["run"], extra=EXTRA_COMMANDS))


if __name__ == "__main__":
    main()

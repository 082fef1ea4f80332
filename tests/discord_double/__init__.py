"""A local double of Discord's REST API and gateway for end-to-end tests of a real discord.py bot.

Usage (the `double` fixture in fixtures.py does the first two lines)::

    async with DiscordDouble() as double:
        with double.install(discord):
            guild = double.add_guild()
            alice = double.add_user("alice", guild, permissions=["manage_guild"])
            async with double.run_bot(MyBot()):
                record = await double.slash(alice, guild, None, "echo", options={"text": "hi"})
                message = await record.final_message()
            double.assert_clean()

Faults: ``double.inject_fault("PATCH", r"/webhooks/", 429, retry_after=0.2)`` (see faults.py).
"""

from __future__ import annotations

from .faults import Fault, is_multipart
from .models import Channel, Guild, Role, StoredFile, StoredMessage, User
from .records import Action, InteractionRecord
from .server import DiscordDouble

__all__ = [
    "Action",
    "Channel",
    "DiscordDouble",
    "Fault",
    "Guild",
    "InteractionRecord",
    "Role",
    "StoredFile",
    "StoredMessage",
    "User",
    "is_multipart",
]

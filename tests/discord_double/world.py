"""The double's world: the bot, its application, guilds, channels, users, files, messages and commands.

`World` is the state half of DiscordDouble (the server half serves it); tests build the world through it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from .models import (
    DEFAULT_UPLOAD_LIMIT,
    EVERYONE_DEFAULT,
    Channel,
    Guild,
    Role,
    Snowflakes,
    StoredFile,
    StoredMessage,
    User,
    permission_bits,
)
from .records import InteractionRecord

__all__ = ["World", "Permissions"]

log = logging.getLogger(__name__)

Permissions = int | str | list[str] | tuple[str, ...] | set[str]


class World:
    """Everything the double knows; all times are seconds."""

    def __init__(
        self,
        *,
        token: str = "double-bot-token",
        bot_name: str = "DreamBot",
        ack_deadline: float = 3.0,
        token_ttl: float = 900.0,
        default_upload_limit: int = DEFAULT_UPLOAD_LIMIT,
    ) -> None:
        self.ids = Snowflakes()
        self.token = token
        self.ack_deadline = ack_deadline
        self.token_ttl = token_ttl
        self.default_upload_limit = default_upload_limit
        self.application_id = self.ids.next()
        self.application_flags = 0
        self.bot_user = User(self.application_id, bot_name, bot=True)
        self.owner = User(self.ids.next(), "app-owner")
        self.users: dict[int, User] = {u.id: u for u in (self.bot_user, self.owner)}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.messages: dict[int, StoredMessage] = {}
        self.files: dict[int, StoredFile] = {}
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.syncs: list[tuple[int | None, list[dict[str, Any]]]] = []
        self.records: dict[int, InteractionRecord] = {}
        self.records_by_token: dict[str, InteractionRecord] = {}
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.typing: list[int] = []
        self.port = 0

    @property
    def url(self) -> str:
        """The double's HTTP root (valid once started)."""
        return f"http://127.0.0.1:{self.port}"

    def _announce(self, event: str, data: dict[str, Any]) -> None:
        """Send a gateway event to connected bots (the server overrides this)."""

    def add_guild(
        self,
        name: str = "Test Guild",
        *,
        nsfw_channel: bool = False,
        attachment_size_limit: int | None = None,
        channel_name: str = "general",
    ) -> Guild:
        """A guild the bot is in, with one text channel (and an NSFW one if asked)."""
        guild_id = self.ids.next()
        guild = Guild(
            guild_id,
            name,
            self.owner.id,
            attachment_size_limit or self.default_upload_limit,
            roles=[Role(guild_id, "@everyone", EVERYONE_DEFAULT)],
        )
        self.guilds[guild_id] = guild
        guild.members[self.owner.id] = []
        guild.members[self.bot_user.id] = []
        self._new_channel(guild, channel_name, nsfw=False)
        if nsfw_channel:
            self._new_channel(guild, "nsfw", nsfw=True)
        self._announce("GUILD_CREATE", guild.payload(self.users))
        return guild

    def _new_channel(self, guild: Guild, name: str, *, nsfw: bool) -> Channel:
        channel = Channel(self.ids.next(), guild.id, name, nsfw=nsfw, position=len(guild.channels))
        guild.channels.append(channel)
        self.channels[channel.id] = channel
        return channel

    def add_channel(self, guild: Guild, name: str, *, nsfw: bool = False) -> Channel:
        """Another text channel (announced with CHANNEL_CREATE if the bot is connected)."""
        channel = self._new_channel(guild, name, nsfw=nsfw)
        self._announce("CHANNEL_CREATE", channel.payload())
        return channel

    def add_role(self, guild: Guild, name: str, permissions: Permissions = ()) -> Role:
        role = Role(self.ids.next(), name, permission_bits(permissions), position=len(guild.roles))
        guild.roles.append(role)
        return role

    def add_user(
        self,
        name: str,
        guild: Guild | None = None,
        *,
        permissions: Permissions = (),
        roles: Sequence[Role] = (),
    ) -> User:
        """A person; with `guild`, a member there with extra `permissions` (names like "manage_guild")."""
        user = User(self.ids.next(), name)
        self.users[user.id] = user
        if guild is not None:
            self.add_member(guild, user, permissions=permissions, roles=roles)
        return user

    def add_member(
        self, guild: Guild, user: User, *, permissions: Permissions = (), roles: Sequence[Role] = ()
    ) -> None:
        """Make `user` a member of `guild`; permissions beyond @everyone come as a personal role."""
        role_ids = [r.id for r in roles]
        if permission_bits(permissions):
            role_ids.append(self.add_role(guild, f"{user.name}-perms", permissions).id)
        guild.members[user.id] = role_ids

    def add_attachment(self, filename: str, data: bytes, content_type: str | None = None) -> dict[str, Any]:
        """Bytes a person 'uploads'; the attachment object to pass to slash(attachments=...)."""
        return self.store_file(filename, data, content_type=content_type).attachment()

    def store_file(
        self, filename: str, data: bytes, *, ephemeral: bool = False, content_type: str | None = None
    ) -> StoredFile:
        file_id = self.ids.next()
        url = f"{self.url}/attachments/{file_id}/{quote(filename)}"
        stored = StoredFile(file_id, filename, data, url, content_type or "", ephemeral)
        self.files[file_id] = stored
        return stored

    def bot_guilds(self) -> list[Guild]:
        return [g for g in self.guilds.values() if self.bot_user.id in g.members]

    def bot_guild_ids(self) -> set[int]:
        return {g.id for g in self.bot_guilds()}

    def commands(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        """Registered commands: global, or of one guild."""
        return list(self.global_commands if guild_id is None else self.guild_commands.get(guild_id, []))

    def channel_messages(self, channel_id: int, *, include_ephemeral: bool = False) -> list[StoredMessage]:
        """Messages in the channel (bot posts, interaction replies), oldest first, without deleted ones."""
        return sorted(
            (
                m
                for m in self.messages.values()
                if m.channel_id == channel_id and not m.deleted and (include_ephemeral or not m.ephemeral)
            ),
            key=lambda m: m.id,
        )

    def violation(self, text: str) -> None:
        """Record a broken Discord rule (the server calls this)."""
        log.warning("discord double: %s", text)
        self.violations.append(text)

    def take_violations(self, contains: str = "") -> list[str]:
        """Remove and return the violations containing `contains` (for tests that provoke them)."""
        taken = [v for v in self.violations if contains in v]
        self.violations[:] = [v for v in self.violations if contains not in v]
        return taken

    def assert_clean(self) -> None:
        """Fail if the bot broke any Discord rule."""
        if self.violations:
            raise AssertionError("the bot broke Discord rules:\n  " + "\n  ".join(self.violations))

"""The double's world (users, guilds, channels, roles, messages, files) and their Discord JSON payloads."""

from __future__ import annotations

import itertools
import mimetypes
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from PIL import Image, UnidentifiedImageError

from .rules import EPHEMERAL, LOADING

__all__ = [
    "PERMISSIONS",
    "DEFAULT_UPLOAD_LIMIT",
    "Snowflakes",
    "User",
    "Role",
    "Channel",
    "Guild",
    "StoredFile",
    "StoredMessage",
    "iso_now",
    "permission_bits",
]

DISCORD_EPOCH_MS = 1420070400000
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024

# Bit positions from Discord's docs, "Permissions" (the ones a test is likely to name).
PERMISSIONS: dict[str, int] = {
    "create_instant_invite": 1 << 0,
    "kick_members": 1 << 1,
    "ban_members": 1 << 2,
    "administrator": 1 << 3,
    "manage_channels": 1 << 4,
    "manage_guild": 1 << 5,
    "add_reactions": 1 << 6,
    "view_channel": 1 << 10,
    "send_messages": 1 << 11,
    "manage_messages": 1 << 13,
    "embed_links": 1 << 14,
    "attach_files": 1 << 15,
    "read_message_history": 1 << 16,
    "use_external_emojis": 1 << 18,
    "manage_roles": 1 << 28,
    "use_application_commands": 1 << 31,
    "send_messages_in_threads": 1 << 38,
}
ALL_PERMISSIONS = (1 << 51) - 1
EVERYONE_DEFAULT = sum(
    PERMISSIONS[n]
    for n in (
        "view_channel",
        "send_messages",
        "embed_links",
        "attach_files",
        "read_message_history",
        "add_reactions",
        "use_external_emojis",
        "use_application_commands",
        "send_messages_in_threads",
    )
)


def permission_bits(names: int | str | list[str] | tuple[str, ...] | set[str]) -> int:
    """An int of permission bits from an int, one name or several names of PERMISSIONS."""
    if isinstance(names, int):
        return names
    if isinstance(names, str):
        names = [names]
    return sum(PERMISSIONS[n] for n in set(names))


def iso_now() -> str:
    """The current time as Discord writes timestamps."""
    return datetime.now(UTC).isoformat()


class Snowflakes:
    """Discord-style ids: a millisecond timestamp in the high bits, a counter below."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)


@dataclass
class User:
    """A Discord user (the bot itself or a test person)."""

    id: int
    name: str
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "global_name": None if self.bot else self.name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
            "flags": 0,
        }


@dataclass
class Role:
    """A guild role; the @everyone role has the guild's id."""

    id: int
    name: str
    permissions: int
    position: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass
class Channel:
    """A guild text channel (type 0)."""

    id: int
    guild_id: int
    name: str
    nsfw: bool = False
    position: int = 0
    type: int = 0

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "nsfw": self.nsfw,
            "topic": None,
            "parent_id": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }


@dataclass
class Guild:
    """A guild with its channels, roles and members (user id -> role ids)."""

    id: int
    name: str
    owner_id: int
    attachment_size_limit: int = DEFAULT_UPLOAD_LIMIT
    channels: list[Channel] = field(default_factory=list)
    roles: list[Role] = field(default_factory=list)
    members: dict[int, list[int]] = field(default_factory=dict)
    joined_at: str = field(default_factory=iso_now)

    @property
    def text_channel(self) -> Channel:
        """The first non-NSFW text channel."""
        return next(c for c in self.channels if not c.nsfw)

    @property
    def nsfw_channel(self) -> Channel | None:
        """The first NSFW channel, if any."""
        return next((c for c in self.channels if c.nsfw), None)

    def channel(self, name: str) -> Channel:
        """The channel with this name."""
        return next(c for c in self.channels if c.name == name)

    def permissions_of(self, user_id: int) -> int:
        """The member's guild-wide permissions (administrator and ownership grant all)."""
        if user_id == self.owner_id:
            return ALL_PERMISSIONS
        bits = 0
        member_roles = set(self.members.get(user_id, []))
        for role in self.roles:
            if role.id == self.id or role.id in member_roles:
                bits |= role.permissions
        return ALL_PERMISSIONS if bits & PERMISSIONS["administrator"] else bits

    def member_payload(self, user: User, *, with_permissions: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "user": user.payload(),
            "roles": [str(r) for r in self.members.get(user.id, [])],
            "nick": None,
            "avatar": None,
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_permissions:
            data["permissions"] = str(self.permissions_of(user.id))
        return data

    def payload(self, users: dict[int, User]) -> dict[str, Any]:
        """The full GUILD_CREATE payload."""
        members = [self.member_payload(users[uid]) for uid in self.members if uid in users]
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "system_channel_id": None,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "features": [],
            "vanity_url_code": None,
            "application_id": None,
            "roles": [r.payload() for r in self.roles],
            "emojis": [],
            "stickers": [],
            "channels": [c.payload() for c in self.channels],
            "threads": [],
            "members": members,
            "member_count": len(self.members),
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "large": False,
            "unavailable": False,
            "joined_at": self.joined_at,
        }


@dataclass
class StoredFile:
    """Bytes served at /attachments/{id}/{filename}; attachment() is Discord's attachment object."""

    id: int
    filename: str
    data: bytes
    url: str
    content_type: str = ""
    ephemeral: bool = False

    def __post_init__(self) -> None:
        if not self.content_type:
            self.content_type = mimetypes.guess_type(self.filename)[0] or "application/octet-stream"

    def attachment(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.ephemeral:
            data["ephemeral"] = True
        if self.content_type.startswith("image/"):
            # Discord reports the size of any image it can read, a decompression bomb too: Pillow's bomb
            # guard (a warning, an error past twice the limit) is the bot's business, not the probe's.
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(BytesIO(self.data)) as image:
                        data["width"], data["height"] = image.size
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
                pass
        return data


@dataclass
class StoredMessage:
    """A message as Discord keeps it; `data` is the exact payload the double returns for it."""

    data: dict[str, Any]
    deleted: bool = False
    interaction_id: int | None = None
    files: dict[str, StoredFile] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return int(self.data["id"])

    @property
    def channel_id(self) -> int:
        return int(self.data["channel_id"])

    @property
    def content(self) -> str:
        return str(self.data.get("content") or "")

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return list(self.data.get("embeds") or [])

    @property
    def attachments(self) -> list[dict[str, Any]]:
        return list(self.data.get("attachments") or [])

    @property
    def components(self) -> list[dict[str, Any]]:
        return list(self.data.get("components") or [])

    def file_bytes(self, index: int = 0) -> bytes:
        """The bytes of the message's attachment number `index`."""
        return self.files[self.attachments[index]["id"]].data

    def interactive(self) -> list[dict[str, Any]]:
        """Every button and select in the message, flattened in order."""
        found: list[dict[str, Any]] = []
        stack = list(reversed(self.components))
        while stack:
            item = stack.pop()
            if item.get("type") in (2, 3, 5, 6, 7, 8):
                found.append(item)
            inner = list(item.get("components") or [])
            inner += [item["accessory"]] if isinstance(item.get("accessory"), dict) else []
            stack.extend(reversed(inner))
        return found

    def component(self, custom_id: str) -> dict[str, Any] | None:
        """The button or select with this custom_id."""
        return next((c for c in self.interactive() if c.get("custom_id") == custom_id), None)

    def custom_id(self, label: str) -> str:
        """The custom_id of the button labelled `label` (handy for clicking)."""
        for item in self.interactive():
            if item.get("label") == label and item.get("custom_id"):
                return str(item["custom_id"])
        raise LookupError(f"no button labelled {label!r} in message {self.id}")

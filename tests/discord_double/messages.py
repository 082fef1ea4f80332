"""Request bodies (JSON or multipart), JSON replies, and creating/editing stored messages with their files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import rules
from .models import StoredMessage, iso_now

if TYPE_CHECKING:
    from .server import DiscordDouble

__all__ = [
    "Body",
    "BadBody",
    "read_body",
    "json_response",
    "error",
    "create_message",
    "edit_message",
    "check_body",
    "refusal",
]

MESSAGE_FIELDS = ("content", "embeds", "components", "flags", "tts", "poll", "message_reference")


class BadBody(Exception):
    """The request body is not JSON / multipart as Discord expects."""


@dataclass
class Body:
    """A parsed request: the JSON payload (payload_json for multipart) and the uploaded files in order."""

    payload: dict[str, Any]
    files: list[tuple[str, bytes]] = field(default_factory=list)


async def read_body(request: web.Request) -> Body:
    """Parse a JSON or multipart/form-data body (fields payload_json and files[n])."""
    if request.content_type.startswith("multipart/"):
        payload: dict[str, Any] = {}
        files: dict[int, tuple[str, bytes]] = {}
        reader = await request.multipart()
        async for part in reader:
            name = getattr(part, "name", None) or ""
            if name == "payload_json":
                payload = json.loads(await part.text())  # type: ignore[union-attr]
            elif name.startswith("files[") and name.endswith("]"):
                data = await part.read()  # type: ignore[union-attr]
                filename = getattr(part, "filename", None) or f"file{len(files)}"
                files[int(name[6:-1])] = (filename, bytes(data))
            else:
                raise BadBody(f"unexpected multipart field {name!r}")
        return Body(payload, [files[i] for i in sorted(files)])
    raw = await request.read()
    if not raw:
        return Body({})
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise BadBody(f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadBody("body must be a JSON object")
    return Body(payload)


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON reply with content type exactly application/json (discord.py needs no charset suffix)."""
    return web.Response(
        status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )


def error(status: int, code: int, message: str, problems: list[str] | None = None) -> web.Response:
    """Discord's error body: {"message", "code"} (+ "errors" for invalid form bodies)."""
    data: dict[str, Any] = {"message": message, "code": code}
    if problems:
        data["errors"] = {"_errors": [{"code": "BASE_TYPE_INVALID", "message": p} for p in problems]}
    return json_response(data, status)


def refusal(problems: list[str]) -> tuple[int, int, str]:
    """Discord's answer to a refused body: 413/40005 when files are too big, else 400/50035."""
    if any("upload limit" in p for p in problems):
        return 413, 40005, "Request entity too large"
    return 400, 50035, "Invalid Form Body"


def check_body(body: Body, *, limit: int, interaction: bool, edit: bool = False) -> list[str]:
    """Rule problems of a message body and its files."""
    problems = rules.check_message(body.payload, interaction=interaction, edit=edit)
    problems += rules.check_files([len(data) for _, data in body.files], limit)
    visible = ("content", "embeds", "components", "poll", "sticker_ids")
    if not edit and not body.files and not any(body.payload.get(key) for key in visible):
        problems.append("cannot send an empty message")
    return problems


def _attachments(
    double: DiscordDouble, body: Body, message: StoredMessage, *, ephemeral: bool
) -> list[dict[str, Any]]:
    """New attachment list: kept existing ones (by id) plus uploads, named by payload 'attachments'."""
    existing = {a["id"]: a for a in message.attachments}
    listed = body.payload.get("attachments")
    if listed is None:
        kept = list(existing.values())
        names = {}
    else:
        kept = [existing[str(a.get("id"))] for a in listed if str(a.get("id")) in existing]
        names = {str(a.get("id")): a.get("filename") for a in listed if str(a.get("id")) not in existing}
    for key in [k for k in message.files if k not in {a["id"] for a in kept}]:
        del message.files[key]
    result = list(kept)
    for index, (filename, data) in enumerate(body.files):
        stored = double.store_file(names.get(str(index)) or filename, data, ephemeral=ephemeral)
        message.files[str(stored.id)] = stored
        result.append(stored.attachment())
    return result


def create_message(
    double: DiscordDouble,
    channel_id: int,
    body: Body,
    *,
    flags: int = 0,
    msg_type: int = 0,
    interaction: dict[str, Any] | None = None,
) -> StoredMessage:
    """Store a new message sent by the bot and return it (the caller validated the body)."""
    channel = double.channels[channel_id]
    data: dict[str, Any] = {
        "id": str(double.ids.next()),
        "channel_id": str(channel_id),
        "guild_id": str(channel.guild_id),
        "type": msg_type,
        "content": "",
        "author": double.bot_user.payload(),
        "embeds": [],
        "components": [],
        "attachments": [],
        "mentions": [],
        "mention_roles": [],
        "mention_everyone": False,
        "pinned": False,
        "tts": False,
        "timestamp": iso_now(),
        "edited_timestamp": None,
        "flags": flags,
    }
    if interaction is not None:
        data["webhook_id"] = str(double.application_id)
        data["application_id"] = str(double.application_id)
        data["interaction_metadata"] = interaction
    message = StoredMessage(data)
    _apply(double, message, body)
    message.data["flags"] = flags
    double.messages[message.id] = message
    return message


def edit_message(double: DiscordDouble, message: StoredMessage, body: Body) -> None:
    """Apply an edit (PATCH or update callback); it ends a loading state, ephemerality never changes."""
    _apply(double, message, body)
    flags = message.flags
    if body.payload.get("flags") is not None:
        flags = int(body.payload["flags"]) | (flags & rules.EPHEMERAL)
    message.data["flags"] = flags & ~rules.LOADING
    message.data["edited_timestamp"] = iso_now()


def _apply(double: DiscordDouble, message: StoredMessage, body: Body) -> None:
    for key in MESSAGE_FIELDS:
        if key in body.payload and key != "flags":
            value = body.payload[key]
            message.data[key] = (
                value if value is not None else ([] if key in ("embeds", "components") else "")
            )
    if body.files or "attachments" in body.payload:
        message.data["attachments"] = _attachments(double, body, message, ephemeral=message.ephemeral)

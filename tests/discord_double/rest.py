"""Bot-authenticated REST routes (login, gateway, command sync, channel messages), attachments, catch-all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from . import rules
from .messages import (
    BadBody,
    check_body,
    create_message,
    edit_message,
    error,
    json_response,
    read_body,
    refusal,
)

if TYPE_CHECKING:
    from .server import DiscordDouble

__all__ = ["BotRoutes"]


class BotRoutes:
    """aiohttp handlers bound to one DiscordDouble; every route but attachments needs `Bot <token>` auth."""

    def __init__(self, double: DiscordDouble) -> None:
        self.double = double

    def add_to(self, app: web.Application, base: str) -> None:
        r = app.router
        r.add_get(base + "/users/@me", self.me)
        r.add_get(base + "/oauth2/applications/@me", self.application)
        r.add_get(base + "/gateway", self.gateway)
        r.add_get(base + "/gateway/bot", self.gateway_bot)
        for path in ("/applications/{app}/commands", "/applications/{app}/guilds/{guild}/commands"):
            r.add_put(base + path, self.put_commands)
            r.add_get(base + path, self.get_commands)
        r.add_get(base + "/channels/{cid}", self.get_channel)
        r.add_post(base + "/channels/{cid}/typing", self.typing)
        r.add_get(base + "/channels/{cid}/messages", self.list_messages)
        r.add_post(base + "/channels/{cid}/messages", self.post_message)
        msg = base + "/channels/{cid}/messages/{mid}"
        r.add_get(msg, self.get_message)
        r.add_patch(msg, self.edit_message)
        r.add_delete(msg, self.delete_message)
        r.add_get("/attachments/{fid}/{filename}", self.attachment)
        r.add_route("*", "/{tail:.*}", self.unknown)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Log every request; refuse bot routes without the right token (interaction routes need none)."""
        double = self.double
        double.requests.append((request.method, request.path))
        open_prefixes = ("/attachments/", double.api_path + "/interactions/", double.api_path + "/webhooks/")
        if request.path == "/gateway" or request.path.startswith(open_prefixes):
            return await handler(request)
        if request.headers.get("Authorization") != f"Bot {double.token}":
            double.violation(f"{request.method} {request.path}: missing or wrong bot token")
            return error(401, 0, "401: Unauthorized")
        return await handler(request)

    # ---- login / gateway ---------------------------------------------------------------------------

    async def me(self, request: web.Request) -> web.Response:
        d = self.double
        return json_response(
            d.bot_user.payload() | {"verified": True, "mfa_enabled": False, "locale": "en-US"}
        )

    async def application(self, request: web.Request) -> web.Response:
        d = self.double
        return json_response(
            {
                "id": str(d.application_id),
                "name": d.bot_user.name,
                "icon": None,
                "description": "",
                "summary": "",
                "bot_public": False,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "owner": d.owner.payload(),
                "team": None,
                "flags": d.application_flags,
                "bot": d.bot_user.payload(),
            }
        )

    async def gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.double.gateway_url})

    async def gateway_bot(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return json_response({"url": self.double.gateway_url, "shards": 1, "session_start_limit": limit})

    # ---- application commands --------------------------------------------------------------------

    def _command_scope(self, request: web.Request) -> tuple[int | None, web.Response | None]:
        d = self.double
        if request.match_info["app"] != str(d.application_id):
            return None, error(403, 50001, "Missing Access")
        guild = request.match_info.get("guild")
        if guild is None:
            return None, None
        if not guild.isdigit() or int(guild) not in d.bot_guild_ids():
            return None, error(403, 50001, "Missing Access")
        return int(guild), None

    async def put_commands(self, request: web.Request) -> web.Response:
        d = self.double
        guild_id, refused = self._command_scope(request)
        if refused is not None:
            d.violation(f"PUT {request.path}: not this application's guild or id")
            return refused
        commands = await request.json()
        if not isinstance(commands, list):
            return self._invalid(request, ["body must be a JSON list of commands"])
        problems = rules.check_commands(commands, guild=guild_id is not None)
        if problems:
            return self._invalid(request, problems)
        old = {(c.get("type", 1), c["name"]): c["id"] for c in d.commands(guild_id)}
        stored = [self._stored_command(c, guild_id, old) for c in commands]
        if guild_id is None:
            d.global_commands = stored
        else:
            d.guild_commands[guild_id] = stored
        d.syncs.append((guild_id, stored))
        return json_response(stored)

    def _invalid(self, request: web.Request, problems: list[str]) -> web.Response:
        for problem in problems:
            self.double.violation(f"{request.method} {request.path}: {problem}")
        status, code, message = refusal(problems)
        return error(status, code, message, problems)

    def _stored_command(
        self, command: dict[str, Any], guild_id: int | None, old: dict[tuple[int, str], str]
    ) -> dict[str, Any]:
        d = self.double
        kind = command.get("type", 1)
        stored = {
            "type": kind,
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
        } | command
        stored["id"] = old.get((kind, command["name"])) or str(d.ids.next())
        stored["application_id"] = str(d.application_id)
        stored["version"] = str(d.ids.next())
        if guild_id is not None:
            stored["guild_id"] = str(guild_id)
        return stored

    async def get_commands(self, request: web.Request) -> web.Response:
        guild_id, refused = self._command_scope(request)
        return refused or json_response(self.double.commands(guild_id))

    # ---- channels ----------------------------------------------------------------------------------

    def _channel(self, request: web.Request) -> Any:
        d = self.double
        cid = request.match_info["cid"]
        channel = d.channels.get(int(cid)) if cid.isdigit() else None
        if channel is None or channel.guild_id not in d.bot_guild_ids():
            return None
        return channel

    async def get_channel(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        return error(404, 10003, "Unknown Channel") if channel is None else json_response(channel.payload())

    async def typing(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        if channel is None:
            return error(404, 10003, "Unknown Channel")
        self.double.typing.append(channel.id)
        return web.Response(status=204)

    async def list_messages(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        if channel is None:
            return error(404, 10003, "Unknown Channel")
        limit = int(request.query.get("limit", "50"))
        found = self.double.channel_messages(channel.id)
        return json_response([m.data for m in reversed(found)][:limit])

    async def post_message(self, request: web.Request) -> web.Response:
        d = self.double
        channel = self._channel(request)
        if channel is None:
            d.violation(f"POST {request.path}: unknown channel")
            return error(404, 10003, "Unknown Channel")
        try:
            body = await read_body(request)
        except BadBody as exc:
            d.violation(f"POST {request.path}: {exc}")
            return error(400, 50109, str(exc))
        limit = d.guilds[channel.guild_id].attachment_size_limit
        problems = check_body(body, limit=limit, interaction=False)
        if problems:
            return self._invalid(request, problems)
        msg_type = 19 if body.payload.get("message_reference") else 0
        message = create_message(
            d, channel.id, body, flags=int(body.payload.get("flags") or 0), msg_type=msg_type
        )
        await d.notify_messages()
        return json_response(message.data)

    def _message(self, request: web.Request) -> Any:
        channel = self._channel(request)
        mid = request.match_info["mid"]
        message = self.double.messages.get(int(mid)) if mid.isdigit() else None
        if channel is None or message is None or message.deleted or message.channel_id != channel.id:
            return None
        return message

    async def get_message(self, request: web.Request) -> web.Response:
        message = self._message(request)
        return error(404, 10008, "Unknown Message") if message is None else json_response(message.data)

    async def edit_message(self, request: web.Request) -> web.Response:
        d = self.double
        message = self._message(request)
        if message is None:
            return error(404, 10008, "Unknown Message")
        if message.data["author"]["id"] != str(d.bot_user.id):
            d.violation(f"PATCH {request.path}: editing a message the bot did not author")
            return error(403, 50005, "Cannot edit a message authored by another user")
        try:
            body = await read_body(request)
        except BadBody as exc:
            return error(400, 50109, str(exc))
        limit = d.guilds[d.channels[message.channel_id].guild_id].attachment_size_limit
        problems = check_body(body, limit=limit, interaction=False, edit=True)
        if problems:
            return self._invalid(request, problems)
        edit_message(d, message, body)
        await d.notify_messages()
        return json_response(message.data)

    async def delete_message(self, request: web.Request) -> web.Response:
        message = self._message(request)
        if message is None:
            return error(404, 10008, "Unknown Message")
        message.deleted = True
        await self.double.notify_messages()
        return web.Response(status=204)

    # ---- files and everything else --------------------------------------------------------------------

    async def attachment(self, request: web.Request) -> web.Response:
        fid = request.match_info["fid"]
        stored = self.double.files.get(int(fid)) if fid.isdigit() else None
        if stored is None or stored.filename != request.match_info["filename"]:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=stored.data, headers={"Content-Type": stored.content_type})

    async def unknown(self, request: web.Request) -> web.Response:
        self.double.violation(f"{request.method} {request.path}: route not served by the double")
        return error(404, 0, "404: Not Found")

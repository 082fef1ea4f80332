"""Interaction REST routes: the initial callback, follow-ups and @original / follow-up edits and deletes.

Enforces Discord's ack rules: the first response within `double.ack_deadline` seconds (else 404 code 10062),
exactly one initial response (else 400 code 40060), the callback type fitting the interaction type, follow-ups
only after a response, and the token's 15-minute lifetime.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import rules
from .messages import (
    BadBody,
    Body,
    check_body,
    create_message,
    edit_message,
    error,
    json_response,
    read_body,
    refusal,
)
from .records import Action, InteractionRecord

if TYPE_CHECKING:
    from .server import DiscordDouble

__all__ = ["InteractionRoutes"]

# Docs, "Responding to an Interaction": which callback types fit which interaction types.
ALLOWED_CALLBACKS: dict[int, set[int]] = {1: {1}, 2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}
COMMAND_TYPES = {2: 20}  # message type of a reply to a slash command (CHAT_INPUT_COMMAND)


class InteractionRoutes:
    """aiohttp handlers bound to one DiscordDouble."""

    def __init__(self, double: DiscordDouble) -> None:
        self.double = double

    def add_to(self, app: web.Application, base: str) -> None:
        r = app.router
        r.add_post(base + "/interactions/{id}/{token}/callback", self.callback)
        r.add_post(base + "/webhooks/{app}/{token}", self.followup)
        hook = base + "/webhooks/{app}/{token}/messages/{mid}"
        r.add_get(hook, self.get_message)
        r.add_patch(hook, self.edit)
        r.add_delete(hook, self.delete)

    # ---- helpers -------------------------------------------------------------------------------------

    def _refuse(
        self, where: str, status: int, code: int, message: str, problems: list[str] | None = None
    ) -> web.Response:
        detail = "; ".join(problems) if problems else message
        self.double.violation(f"{where}: {detail} (answered {status}, code {code})")
        return error(status, code, message, problems)

    async def _refuse_action(
        self,
        record: InteractionRecord,
        action: Action,
        where: str,
        code: int,
        message: str,
        problems: list[str] | None = None,
    ) -> web.Response:
        action.code = code
        await self._done(record, action)
        return self._refuse(where, action.status, code, message, problems)

    async def _invalid(
        self, record: InteractionRecord, action: Action, where: str, problems: list[str]
    ) -> web.Response:
        action.status, code, message = refusal(problems)
        return await self._refuse_action(record, action, where, code, message, problems)

    def _record_for_hook(self, request: web.Request) -> InteractionRecord | web.Response:
        double = self.double
        where = f"{request.method} {request.path}"
        record = double.records_by_token.get(request.match_info["token"])
        if record is None or request.match_info["app"] != str(double.application_id):
            return self._refuse(where, 404, 10015, "Unknown Webhook")
        if time.monotonic() - record.dispatched_at > double.token_ttl:
            return self._refuse(where, 401, 50027, "Invalid Webhook Token")
        if not record.responded:
            return self._refuse(where, 404, 10015, "Unknown Webhook")
        return record

    async def _done(self, record: InteractionRecord, action: Action) -> None:
        await record.add(action)
        await self.double.notify_messages()

    @staticmethod
    def _elapsed(record: InteractionRecord) -> float:
        return time.monotonic() - record.dispatched_at

    def _limit(self, record: InteractionRecord) -> int:
        return int(record.payload.get("attachment_size_limit") or self.double.default_upload_limit)

    # ---- initial response ------------------------------------------------------------------------------

    async def callback(self, request: web.Request) -> web.Response:
        double = self.double
        where = f"POST {request.path}"
        try:
            body = await read_body(request)
        except BadBody as exc:
            return self._refuse(where, 400, 50109, str(exc))
        record = double.records.get(int(request.match_info["id"]))
        if record is None or record.token != request.match_info["token"]:
            return self._refuse(where, 404, 10062, "Unknown interaction")
        ctype = body.payload.get("type")
        action = Action(
            "callback", body.payload, 400, self._elapsed(record), callback_type=ctype, files=body.files
        )
        if record.responded:
            return await self._refuse_action(
                record, action, where, 40060, "Interaction has already been acknowledged."
            )
        if action.at > double.ack_deadline:
            action.status = 404
            return await self._refuse_action(
                record,
                action,
                where,
                10062,
                "Unknown interaction",
                [f"first response after {action.at:.2f} s"],
            )
        problems = self._check_callback(record, ctype, body)
        if problems:
            return await self._invalid(record, action, where, problems)
        record.responded = True
        resource = self._apply_callback(record, int(ctype or 0), body, action)
        action.status = 200
        await self._done(record, action)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        message = action.message
        interaction: dict[str, Any] = {"id": str(record.id), "type": record.type}
        if message is not None:
            interaction |= {
                "response_message_id": str(message.id),
                "response_message_loading": message.loading,
                "response_message_ephemeral": message.ephemeral,
            }
        return json_response({"interaction": interaction, "resource": resource})

    def _check_callback(self, record: InteractionRecord, ctype: Any, body: Body) -> list[str]:
        if ctype not in ALLOWED_CALLBACKS.get(record.type, set()):
            return [f"callback type {ctype!r} is not allowed for interaction type {record.type}"]
        data = body.payload.get("data") or {}
        if ctype in (6, 7) and record.source_message_id is None:
            return [f"callback type {ctype} needs a message (the interaction did not come from one)"]
        if ctype in (4, 7):
            return check_body(
                Body(data, body.files), limit=self._limit(record), interaction=True, edit=ctype == 7
            )
        if ctype == 5 and (data.get("flags") or 0) & ~rules.EPHEMERAL:
            return [f"a deferred response may only set the EPHEMERAL flag, got {data.get('flags')}"]
        if ctype == 8:
            return rules.check_autocomplete(data)
        if ctype == 9:
            return rules.check_modal(data)
        if body.files:
            return [f"callback type {ctype} cannot carry files"]
        return []

    def _apply_callback(
        self, record: InteractionRecord, ctype: int, body: Body, action: Action
    ) -> dict[str, Any]:
        double = self.double
        data = dict(body.payload.get("data") or {})
        resource: dict[str, Any] = {"type": ctype}
        if ctype in (4, 5):
            flags = int(data.get("flags") or 0)
            if ctype == 5:
                data, flags = {}, (flags & rules.EPHEMERAL) | rules.LOADING
            msg_type = COMMAND_TYPES.get(record.type, 0)
            message = create_message(
                double,
                record.channel_id,
                Body(data, body.files),
                flags=flags,
                msg_type=msg_type,
                interaction=self._metadata(record),
            )
            message.interaction_id = record.id
            record.original_id = message.id
            action.message = message
        elif ctype in (6, 7):
            assert record.source_message_id is not None
            message = double.messages[record.source_message_id]
            record.original_id = message.id
            if ctype == 7:
                edit_message(double, message, Body(data, body.files))
            action.message = message
        if action.message is not None:
            record.track(action.message)
            if ctype != 6:
                resource["message"] = action.message.data
        return resource

    def _metadata(self, record: InteractionRecord) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(record.id),
            "type": record.type,
            "user": record.user.payload(),
            "authorizing_integration_owners": {"0": str(record.guild_id or 0)},
        }
        if record.type == 2:
            data["name"] = record.data.get("name", "")
        if record.source_message_id is not None:
            data["interacted_message_id"] = str(record.source_message_id)
        return data

    # ---- follow-ups and edits ----------------------------------------------------------------------

    async def followup(self, request: web.Request) -> web.Response:
        where = f"POST {request.path}"
        found = self._record_for_hook(request)
        if isinstance(found, web.Response):
            return found
        record = found
        try:
            body = await read_body(request)
        except BadBody as exc:
            return self._refuse(where, 400, 50109, str(exc))
        action = Action("followup", body.payload, 400, self._elapsed(record), files=body.files)
        problems = check_body(body, limit=self._limit(record), interaction=True)
        if problems:
            return await self._invalid(record, action, where, problems)
        original = record.original
        if original is not None and original.loading and not original.deleted:
            # Discord: the first follow-up after a "thinking" defer replaces the loading message.
            edit_message(
                self.double,
                original,
                Body({k: v for k, v in body.payload.items() if k != "flags"}, body.files),
            )
            message = original
        else:
            flags = int(body.payload.get("flags") or 0)
            message = create_message(
                self.double, record.channel_id, body, flags=flags, interaction=self._metadata(record)
            )
            message.interaction_id = record.id
            record.followup_ids.append(message.id)
        action.status, action.message = 200, message
        await self._done(record, action)
        if request.query.get("wait") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response(message.data)

    def _message_of(self, record: InteractionRecord, mid: str) -> Any:
        target = record.original_id if mid == "@original" else int(mid) if mid.isdigit() else None
        mine = {record.original_id, *record.followup_ids}
        message = self.double.messages.get(target) if target in mine and target is not None else None
        return None if message is None or message.deleted else message

    async def get_message(self, request: web.Request) -> web.Response:
        found = self._record_for_hook(request)
        if isinstance(found, web.Response):
            return found
        message = self._message_of(found, request.match_info["mid"])
        if message is None:
            return error(404, 10008, "Unknown Message")
        return json_response(message.data)

    async def edit(self, request: web.Request) -> web.Response:
        where = f"PATCH {request.path}"
        found = self._record_for_hook(request)
        if isinstance(found, web.Response):
            return found
        record = found
        try:
            body = await read_body(request)
        except BadBody as exc:
            return self._refuse(where, 400, 50109, str(exc))
        action = Action("edit", body.payload, 404, self._elapsed(record), files=body.files)
        message = self._message_of(record, request.match_info["mid"])
        if message is None:
            return await self._refuse_action(record, action, where, 10008, "Unknown Message")
        action.status = 400
        problems = check_body(body, limit=self._limit(record), interaction=True, edit=True)
        if problems:
            return await self._invalid(record, action, where, problems)
        edit_message(self.double, message, body)
        action.status, action.message = 200, message
        await self._done(record, action)
        return json_response(message.data)

    async def delete(self, request: web.Request) -> web.Response:
        where = f"DELETE {request.path}"
        found = self._record_for_hook(request)
        if isinstance(found, web.Response):
            return found
        record = found
        action = Action("delete", {}, 404, self._elapsed(record))
        message = self._message_of(record, request.match_info["mid"])
        if message is None:
            return await self._refuse_action(record, action, where, 10008, "Unknown Message")
        message.deleted = True
        action.status, action.message = 204, message
        await self._done(record, action)
        return web.Response(status=204)

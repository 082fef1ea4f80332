"""The double's websocket gateway: HELLO, heartbeats, IDENTIFY -> READY + GUILD_CREATE, RESUME with replay."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from .server import DiscordDouble

__all__ = ["Gateway", "GatewaySession"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_MS = 41250
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_PRESENCE, OP_VOICE = 0, 1, 2, 3, 4
OP_RESUME, OP_RECONNECT, OP_REQUEST_MEMBERS, OP_INVALID_SESSION, OP_HELLO, OP_ACK = 6, 7, 8, 9, 10, 11


@dataclass
class GatewaySession:
    """One identified session: its event log (for replay) and its current websocket, if connected."""

    id: str
    seq: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    resumes: int = 0

    async def send(self, event: str, data: dict[str, Any]) -> None:
        """Log a dispatch with the next sequence number and send it if connected."""
        self.seq += 1
        frame = {"op": OP_DISPATCH, "s": self.seq, "t": event, "d": data}
        self.log.append(frame)
        if self.ws is not None and not self.ws.closed:
            await self.ws.send_str(json.dumps(frame))


class Gateway:
    """Serves `/gateway`; the DiscordDouble owns one."""

    def __init__(self, double: DiscordDouble) -> None:
        self.double = double
        self.sessions: dict[str, GatewaySession] = {}
        self.identifies = 0
        self.heartbeats = 0
        self.connections: set[web.WebSocketResponse] = set()
        self.down_until = 0.0  # loop time before which new connections wait for their HELLO
        self._changed = asyncio.Condition()

    @property
    def live(self) -> list[GatewaySession]:
        """Sessions with an open websocket."""
        return [s for s in self.sessions.values() if s.ws is not None and not s.ws.closed]

    @property
    def resumes(self) -> int:
        return sum(s.resumes for s in self.sessions.values())

    async def broadcast(self, event: str, data: dict[str, Any]) -> None:
        """Dispatch to every session (connected or waiting to resume), like Discord without sharding."""
        for session in list(self.sessions.values()):
            await session.send(event, data)

    async def drop(self, code: int = 4000, *, down_for: float = 0.0) -> int:
        """Close every live websocket with `code` (4000 = resumable); the number closed.

        down_for: for that many seconds a reconnecting bot gets no HELLO (the network is still down), so
        events dispatched meanwhile wait in the session's log for the RESUME's replay.
        """
        self.down_until = asyncio.get_running_loop().time() + down_for
        live = self.live
        for session in live:
            ws, session.ws = session.ws, None
            assert ws is not None
            await ws.close(code=code, message=b"dropped by test")
        await self._notify()
        return len(live)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until predicate() holds, re-checked on every connect, identify and resume."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def close_all(self) -> None:
        for ws in list(self.connections):
            await ws.close(code=1001, message=b"double stopping")

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.connections.add(ws)
        session: GatewaySession | None = None
        try:
            delay = self.down_until - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._send(ws, {"op": OP_HELLO, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                session = await self._on_frame(ws, frame, session)
        finally:
            self.connections.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
            await self._notify()
        return ws

    async def _send(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        if not ws.closed:
            await ws.send_str(json.dumps(frame))

    async def _on_frame(
        self, ws: web.WebSocketResponse, frame: dict[str, Any], session: GatewaySession | None
    ) -> GatewaySession | None:
        op, data = frame.get("op"), frame.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeats += 1
            await self._send(ws, {"op": OP_ACK})
        elif op == OP_IDENTIFY:
            return await self._identify(ws, data or {})
        elif op == OP_RESUME:
            return await self._resume(ws, data or {})
        elif op == OP_REQUEST_MEMBERS and session is not None:
            await self._members_chunk(session, data or {})
        elif op not in (OP_PRESENCE, OP_VOICE, OP_REQUEST_MEMBERS):
            self.double.violation(f"gateway: unknown opcode {op!r}")
            await ws.close(code=4001, message=b"Unknown opcode")
        return session

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> GatewaySession | None:
        double = self.double
        if data.get("token") != double.token:
            await ws.close(code=4004, message=b"Authentication failed")
            return None
        intents = data.get("intents")
        if not isinstance(intents, int):
            double.violation("gateway: IDENTIFY without integer intents")
        self.identifies += 1
        session = GatewaySession(id=secrets.token_hex(16), ws=ws)
        self.sessions[session.id] = session
        guilds = double.bot_guilds()
        ready = {
            "v": 10,
            "user": double.bot_user.payload() | {"verified": True, "mfa_enabled": False},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": double.gateway_url,
            "shard": [0, 1],
            "application": {"id": str(double.application_id), "flags": double.application_flags},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
        }
        await session.send("READY", ready)
        for guild in guilds:
            await session.send("GUILD_CREATE", guild.payload(double.users))
        await self._notify()
        return session

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> GatewaySession | None:
        session = self.sessions.get(str(data.get("session_id")))
        if session is None or data.get("token") != self.double.token:
            await self._send(ws, {"op": OP_INVALID_SESSION, "d": False})
            return None
        seq = data.get("seq") or 0
        if session.ws is not None and session.ws is not ws and not session.ws.closed:
            await session.ws.close(code=4000, message=b"session resumed elsewhere")
        session.ws = ws
        session.resumes += 1
        for frame in session.log:
            if frame["s"] > seq:
                await self._send(ws, frame)
        await session.send("RESUMED", {})
        await self._notify()
        return session

    async def _members_chunk(self, session: GatewaySession, data: dict[str, Any]) -> None:
        double = self.double
        guild = double.guilds.get(int(data.get("guild_id", 0)))
        if guild is None:
            return
        members = [guild.member_payload(double.users[uid]) for uid in guild.members if uid in double.users]
        chunk = {
            "guild_id": str(guild.id),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
            "presences": [],
        }
        if data.get("nonce"):
            chunk["nonce"] = data["nonce"]
        await session.send("GUILD_MEMBERS_CHUNK", chunk)

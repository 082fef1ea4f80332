"""DiscordDouble: a local stand-in for Discord's REST API and gateway, driven by tests, checking the bot.

Start it, add guilds/users, point discord.py at it with `install(discord)`, run the bot with `run_bot(bot)`,
then act as a person would (`slash`, `click`, `submit_modal`, `autocomplete`) and read what the bot did from
the returned InteractionRecord, `channel_messages()` and `violations`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from types import ModuleType, TracebackType
from typing import Any

import yarl
from aiohttp import web

from .callbacks import InteractionRoutes
from .dispatch import command_data, component_data, modal_data
from .faults import Fault, FaultInjector
from .gateway import Gateway
from .models import DEFAULT_UPLOAD_LIMIT, Channel, Guild, StoredMessage, User
from .records import InteractionRecord
from .rest import BotRoutes
from .world import World

__all__ = ["DiscordDouble"]

log = logging.getLogger(__name__)


class DiscordDouble(World):
    """The double: World's state served over HTTP and a websocket gateway. All times are seconds."""

    api_path = "/api/v10"

    def __init__(
        self,
        *,
        token: str = "double-bot-token",
        bot_name: str = "DreamBot",
        ack_deadline: float = 3.0,
        token_ttl: float = 900.0,
        default_upload_limit: int = DEFAULT_UPLOAD_LIMIT,
    ) -> None:
        super().__init__(
            token=token,
            bot_name=bot_name,
            ack_deadline=ack_deadline,
            token_ttl=token_ttl,
            default_upload_limit=default_upload_limit,
        )
        self.gateway = Gateway(self)
        self.faults = FaultInjector()
        self._runner: web.AppRunner | None = None
        self._messages_changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> DiscordDouble:
        """Serve on 127.0.0.1 at a free port."""
        bot_routes = BotRoutes(self)
        app = web.Application(middlewares=[bot_routes.auth, self.faults.middleware])
        app.router.add_get("/gateway", self.gateway.handle)
        InteractionRoutes(self).add_to(app, self.api_path)
        bot_routes.add_to(app, self.api_path)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Close gateway connections and the server."""
        for task in list(self._tasks):
            await task
        await self.gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DiscordDouble:
        return await self.start()

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """What discord.http.Route.BASE must be."""
        return self.url + self.api_path

    @property
    def gateway_url(self) -> str:
        """What DiscordWebSocket.DEFAULT_GATEWAY must be (also READY's resume_gateway_url)."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    @contextmanager
    def install(self, discord_module: ModuleType) -> Iterator[DiscordDouble]:
        """Point discord.py at the double (Route.BASE, DEFAULT_GATEWAY); restored on exit."""
        route = discord_module.http.Route
        websocket = discord_module.gateway.DiscordWebSocket
        saved = (route.BASE, websocket.DEFAULT_GATEWAY)
        route.BASE, websocket.DEFAULT_GATEWAY = self.base_url, yarl.URL(self.gateway_url)
        try:
            yield self
        finally:
            route.BASE, websocket.DEFAULT_GATEWAY = saved

    @asynccontextmanager
    async def run_bot(self, bot: Any, *, timeout: float = 10.0) -> AsyncIterator[Any]:
        """Start a discord.py Client/Bot with the double's token, yield once it is ready, close it after."""
        task = asyncio.create_task(bot.start(self.token))
        try:
            async with asyncio.timeout(timeout):
                while not bot.is_ready():
                    if task.done():
                        task.result()
                        raise RuntimeError("the bot stopped before it became ready")
                    await asyncio.sleep(0.01)
            yield bot
        finally:
            await bot.close()
            await task

    # ---- faults ------------------------------------------------------------------------------------

    def inject_fault(
        self,
        method: str,
        path_regex: str,
        status: int,
        *,
        times: int | None = 1,
        retry_after: float | None = None,
        code: int | None = None,
        when: Callable[[web.Request], bool] | None = None,
    ) -> Fault:
        """Answer the next ``times`` requests matching ``method`` ("*": any) and ``path_regex`` (searched
        in the path, e.g. ``r"/webhooks/\\d+/[^/]+$"`` for follow-ups) with ``status``, as Discord would.

        429 comes with ``Via`` and JSON ``retry_after`` (discord.py sleeps and retries); 5xx is retried by
        discord.py; 404 gets the route's "unknown ..." code unless ``code`` is given. ``when`` narrows it
        further on the request's headers (not its body), e.g. ``faults.is_multipart``. ``times`` None:
        until :meth:`clear_faults`. The returned :class:`Fault` counts its ``hits``.
        """
        return self.faults.add(
            method, path_regex, status, times=times, retry_after=retry_after, code=code, when=when
        )

    def clear_faults(self) -> None:
        """Stop injecting faults."""
        self.faults.clear()

    # ---- the world -------------------------------------------------------------------------------

    def _announce(self, event: str, data: dict[str, Any]) -> None:
        if self.gateway.sessions:
            task = asyncio.get_running_loop().create_task(self.gateway.broadcast(event, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ---- a person's actions ----------------------------------------------------------------------

    async def _dispatch(
        self,
        kind: int,
        user: User,
        channel: Channel,
        data: dict[str, Any],
        *,
        source: StoredMessage | None = None,
    ) -> InteractionRecord:
        if not self.gateway.sessions:
            raise RuntimeError("no bot has identified on the gateway")
        guild = self.guilds[channel.guild_id]
        if user.id not in guild.members:
            raise PermissionError(f"{user.name} is not a member of {guild.name}")
        interaction_id, token = self.ids.next(), "itok-" + secrets.token_urlsafe(24)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "guild_id": str(guild.id),
            "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
            "channel_id": str(channel.id),
            "channel": channel.payload() | {"permissions": str(guild.permissions_of(user.id))},
            "member": guild.member_payload(user, with_permissions=True),
            "token": token,
            "version": 1,
            "app_permissions": str(guild.permissions_of(self.bot_user.id)),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild.id)},
            "context": 0,
            "attachment_size_limit": guild.attachment_size_limit,
        }
        if source is not None:
            payload["message"] = copy.deepcopy(source.data)
        record = InteractionRecord(
            interaction_id,
            token,
            kind,
            user,
            guild.id,
            channel.id,
            payload,
            source_message_id=None if source is None else source.id,
        )
        self.records[interaction_id] = record
        self.records_by_token[token] = record
        await self.gateway.broadcast("INTERACTION_CREATE", payload)
        return record

    def _all_commands(self, guild: Guild) -> list[dict[str, Any]]:
        return self.commands(guild.id) + self.commands()

    async def slash(
        self,
        user: User,
        guild: Guild,
        channel: Channel | None,
        name: str,
        *,
        options: Mapping[str, Any] | None = None,
        attachments: Mapping[str, Any] | None = None,
        subcommand: str | None = None,
    ) -> InteractionRecord:
        """`user` runs /name (subcommand "sub" or "group sub") in `channel` (default: the guild's text one).

        options: option name -> value (User/Role/Channel objects for those types); attachments: option
        name -> attachment dict from add_attachment() (or a bot message's attachment, or a StoredFile).
        """
        channel = channel or guild.text_channel
        data = command_data(
            self._all_commands(guild),
            name,
            guild,
            channel,
            user,
            options=options,
            attachments=attachments,
            subcommand=subcommand,
        )
        return await self._dispatch(2, user, channel, data)

    async def autocomplete(
        self,
        user: User,
        guild: Guild,
        channel: Channel | None,
        name: str,
        focused: str,
        *,
        options: Mapping[str, Any] | None = None,
        subcommand: str | None = None,
    ) -> InteractionRecord:
        """`user` types in option `focused` of /name (its partial text is options[focused])."""
        channel = channel or guild.text_channel
        options = dict(options or {})
        options.setdefault(focused, "")
        data = command_data(
            self._all_commands(guild),
            name,
            guild,
            channel,
            user,
            options=options,
            subcommand=subcommand,
            focused=focused,
        )
        return await self._dispatch(4, user, channel, data)

    async def click(
        self, user: User, message: StoredMessage | int, custom_id: str, values: list[str] | None = None
    ) -> InteractionRecord:
        """`user` clicks the button (or picks `values` in the select) `custom_id` on a stored message."""
        stored = self.messages.get(message if isinstance(message, int) else message.id)
        if stored is None or stored.deleted:
            raise LookupError(f"message {message!r} does not exist (or was deleted)")
        owner = self.records.get(stored.interaction_id or 0)
        if stored.ephemeral and owner is not None and owner.user.id != user.id:
            raise PermissionError(f"{user.name} cannot see an ephemeral message meant for {owner.user.name}")
        component = stored.component(custom_id)
        if component is None:
            raise LookupError(f"message {stored.id} has no component {custom_id!r}")
        data = component_data(component, values)
        return await self._dispatch(3, user, self.channels[stored.channel_id], data, source=stored)

    async def submit_modal(self, user: User, custom_id: str, values: Mapping[str, str]) -> InteractionRecord:
        """`user` submits the modal `custom_id` the bot showed them, with text input custom_id -> value."""
        for record in reversed(list(self.records.values())):
            modal = record.modal
            if record.user.id == user.id and modal is not None and modal.get("custom_id") == custom_id:
                source = self.messages.get(record.source_message_id or 0)
                data = modal_data(modal, values)
                return await self._dispatch(5, user, self.channels[record.channel_id], data, source=source)
        raise LookupError(f"the bot never showed {user.name} a modal {custom_id!r}")

    # ---- observing the bot --------------------------------------------------------------------------

    async def notify_messages(self) -> None:
        async with self._messages_changed:
            self._messages_changed.notify_all()

    async def wait_for_message(
        self, channel_id: int, predicate: Callable[[StoredMessage], bool] | None = None, timeout: float = 5.0
    ) -> StoredMessage:
        """The first message in the channel (past or future) that satisfies predicate."""

        def found() -> StoredMessage | None:
            return next(
                (m for m in self.channel_messages(channel_id) if predicate is None or predicate(m)), None
            )

        async with self._messages_changed:
            await asyncio.wait_for(self._messages_changed.wait_for(lambda: found() is not None), timeout)
        message = found()
        assert message is not None
        return message

    async def drop_connection(self, code: int = 4000, *, down_for: float = 0.0) -> int:
        """Close the bot's gateway websocket(s) as a network drop would; the bot should RESUME.

        down_for: seconds before a reconnecting bot is served again (events meanwhile are replayed).
        """
        return await self.gateway.drop(code, down_for=down_for)

    async def wait_resumed(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until the gateway has seen `count` RESUMEs in all."""
        await self.gateway.wait(lambda: self.gateway.resumes >= count, timeout)

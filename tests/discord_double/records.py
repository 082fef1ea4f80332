"""What the bot did for one interaction: an ordered list of actions, with async waiting helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .models import StoredMessage, User

__all__ = ["Action", "InteractionRecord"]


@dataclass
class Action:
    """One request the bot made for an interaction.

    kind is "callback", "followup", "edit" or "delete". `payload` is the JSON the bot sent (payload_json for
    multipart), `files` the uploaded (filename, bytes) pairs, `message` the message it produced or changed
    (its state right after the action), `status`/`code` what the double answered (code = Discord error code).
    """

    kind: str
    payload: dict[str, Any]
    status: int
    at: float
    callback_type: int | None = None
    files: list[tuple[str, bytes]] = field(default_factory=list)
    message: StoredMessage | None = None
    code: int | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class InteractionRecord:
    """An interaction the double dispatched, and everything the bot answered to it, in order."""

    id: int
    token: str
    type: int
    user: User
    guild_id: int | None
    channel_id: int
    payload: dict[str, Any]
    dispatched_at: float = field(default_factory=time.monotonic)
    actions: list[Action] = field(default_factory=list)
    original_id: int | None = None
    source_message_id: int | None = None
    responded: bool = False
    followup_ids: list[int] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)
    _messages: dict[int, StoredMessage] = field(default_factory=dict, repr=False)

    @property
    def data(self) -> dict[str, Any]:
        """The interaction's `data` object as dispatched."""
        return dict(self.payload.get("data") or {})

    async def add(self, action: Action) -> None:
        """Append an action (called by the server) and wake waiters."""
        self.actions.append(action)
        if action.message is not None:
            self._messages[action.message.id] = action.message
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Action], bool], timeout: float = 5.0) -> Action:
        """The first action (past or future) that satisfies predicate; TimeoutError after `timeout` s."""

        def found() -> Action | None:
            return next((a for a in self.actions if predicate(a)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), timeout)
        action = found()
        assert action is not None
        return action

    async def response(self, timeout: float = 5.0) -> Action:
        """The first callback (initial response) the bot sent, accepted or not."""
        return await self.wait_for(lambda a: a.kind == "callback", timeout)

    async def settled(self, quiet: float = 0.2, timeout: float = 5.0) -> list[Action]:
        """Wait until at least one action arrived and then none for `quiet` seconds; the actions."""
        deadline = time.monotonic() + timeout
        await self.wait_for(lambda a: True, timeout)
        while True:
            count = len(self.actions)
            await asyncio.sleep(quiet)
            if len(self.actions) == count:
                return list(self.actions)
            if time.monotonic() > deadline:
                raise TimeoutError(f"interaction {self.id} still busy after {timeout} s")

    async def final_message(self, quiet: float = 0.2, timeout: float = 5.0) -> StoredMessage:
        """The last visible message the bot produced or changed, once it has gone quiet.

        Waits until a non-loading message exists (a deferred reply alone does not count), then for `quiet`
        seconds with no new action; returns that message's current state.
        """

        def visible(action: Action) -> bool:
            message = action.message
            return action.ok and message is not None and not message.loading and not message.deleted

        await self.wait_for(visible, timeout)
        actions = await self.settled(quiet, timeout)
        last = [a.message for a in actions if visible(a) and a.message is not None]
        return last[-1]

    @property
    def original(self) -> StoredMessage | None:
        """The @original message (for component interactions answered by 6/7: the clicked message)."""
        return None if self.original_id is None else self._messages.get(self.original_id)

    @property
    def followups(self) -> list[StoredMessage]:
        """Follow-up messages in the order they were sent (current state)."""
        return [self._messages[i] for i in self.followup_ids if i in self._messages]

    @property
    def errors(self) -> list[Action]:
        """Actions the double refused (status >= 400)."""
        return [a for a in self.actions if not a.ok]

    @property
    def callbacks(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "callback"]

    @property
    def modal(self) -> dict[str, Any] | None:
        """The data of an accepted modal response (type 9), if any."""
        for action in self.callbacks:
            if action.ok and action.callback_type == 9:
                return dict(action.payload.get("data") or {})
        return None

    @property
    def choices(self) -> list[dict[str, Any]] | None:
        """The choices of an accepted autocomplete response (type 8), if any."""
        for action in self.callbacks:
            if action.ok and action.callback_type == 8:
                return list((action.payload.get("data") or {}).get("choices") or [])
        return None

    def track(self, message: StoredMessage) -> None:
        """Remember a message belonging to this interaction (the server calls this)."""
        self._messages[message.id] = message

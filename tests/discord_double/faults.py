"""Injected faults: the double answers chosen requests with an error, as Discord does on a bad day.

``double.inject_fault("PATCH", r"/webhooks/.*/messages/", 429, retry_after=0.2)`` makes the next matching
request get a 429 the way Discord sends it (a ``Via`` header and a JSON ``retry_after``, so discord.py
sleeps and retries); 500/502/503/504 are retried by discord.py too; 404 carries Discord's code for the
route (10062 "Unknown interaction" for callbacks, 10015 "Unknown Webhook" for follow-ups and their edits,
10008 "Unknown Message" elsewhere), 401 code 50027 (an expired token). A faulted request never reaches
the real handler, so nothing it asked for happens. Each :class:`Fault` counts the requests it answered.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from .messages import error, json_response

__all__ = ["Fault", "FaultInjector", "is_multipart"]

#: status -> (default Discord code, message)
DEFAULTS: dict[int, tuple[int, str]] = {
    400: (50035, "Invalid Form Body"),
    401: (50027, "Invalid Webhook Token"),
    403: (50001, "Missing Access"),
    404: (10008, "Unknown Message"),
    429: (0, "You are being rate limited."),
}


def _default_404(path: str) -> tuple[int, str]:
    if "/interactions/" in path:
        return 10062, "Unknown interaction"
    if "/webhooks/" in path:
        return 10015, "Unknown Webhook"
    return DEFAULTS[404]


def is_multipart(request: web.Request) -> bool:
    """A ``when`` predicate: the request uploads files (a result with images, a preview)."""
    return request.content_type.startswith("multipart/")


@dataclass
class Fault:
    """One injected fault: which requests it answers (method, path regex, optional ``when``) and how.

    ``times`` None answers every matching request until :meth:`FaultInjector.clear`; ``hits`` counts the
    requests answered so far, ``hit_paths`` their paths.
    """

    method: str
    path: re.Pattern[str]
    status: int
    times: int | None = 1
    retry_after: float | None = None
    code: int | None = None
    when: Callable[[web.Request], bool] | None = None
    hits: int = 0
    hit_paths: list[str] = field(default_factory=list)

    @property
    def spent(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, request: web.Request) -> bool:
        return (
            not self.spent
            and self.method in ("*", request.method.upper())
            and self.path.search(request.path) is not None
            and (self.when is None or self.when(request))
        )

    def response(self, request: web.Request) -> web.Response:
        """Discord's answer for this fault."""
        if self.status == 429:
            retry_after = 0.05 if self.retry_after is None else self.retry_after
            body = {
                "message": DEFAULTS[429][1],
                "retry_after": retry_after,
                "global": False,
                "code": self.code or 0,
            }
            response = json_response(body, 429)
            response.headers["Via"] = "1.1 google"  # discord.py retries only what passed Cloudflare
            response.headers["Retry-After"] = str(max(1, round(retry_after)))
            response.headers["X-RateLimit-Scope"] = "user"
            return response
        if self.status >= 500:
            return error(self.status, 0, f"{self.status}: Internal Server Error")
        if self.status == 404:
            code, message = _default_404(request.path)
        else:
            code, message = DEFAULTS.get(self.status, (0, f"{self.status}: Error"))
        return error(self.status, code if self.code is None else self.code, message)


class FaultInjector:
    """The faults of one double, and the aiohttp middleware that applies them (first match wins)."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def add(
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
        fault = Fault(method.upper(), re.compile(path_regex), status, times, retry_after, code, when)
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault (their counts stay readable on the Fault objects)."""
        self.faults.clear()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        for fault in self.faults:
            if fault.matches(request):
                fault.hits += 1
                fault.hit_paths.append(request.path)
                await request.read()  # drain the upload, as a server that refused it would
                return fault.response(request)
        return await handler(request)

"""Download a file a user links to (``/lora import url:...``) without letting it reach the bot's network.

A bot fetching user-supplied URLs is an SSRF target: the cloud metadata service (169.254.169.254),
``localhost`` admin ports, private networks, redirects from an allowed site to anywhere, names that
resolve to a private address (or change their answer after the check), endless or huge bodies.
:func:`fetch_to_file` therefore allows only ``https`` links without user info, on port 443, to a host
name (never an IP literal) on the admin's allow-list (:func:`host_allowed`); resolves each host once per
hop, refuses it unless every address is public (:func:`is_public_address`), and connects to exactly
those addresses while TLS (SNI, certificate) and ``Host`` keep the name, so DNS cannot rebind in
between; follows redirects one at a time, checking each hop like the first; and streams the body to a
temporary file under a size cap, a total deadline and an idle timeout. Any failure deletes the partial
file and raises :class:`~storage.errors.InvalidRequestError` naming at most the host the user typed
(never resolved addresses, redirect targets or query strings, which may hold tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import unicodedata
import warnings
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import SecretStr
from yarl import URL

from storage.errors import InvalidRequestError

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "DEFAULT_CONTENT_TYPES",
    "FetchedFile",
    "Resolver",
    "check_url",
    "fetch_to_file",
    "host_allowed",
    "import_headers",
    "is_public_address",
    "system_resolver",
]

log = logging.getLogger(__name__)

#: ``async (host, port) -> addresses`` (IP address strings); raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

#: Where Hugging Face and Civitai downloads start and where they redirect (checked 2026). An entry is an
#: exact host name; an entry starting with "." (or "*.") matches any subdomain of it, not the name itself.
DEFAULT_ALLOWED_HOSTS: Final = (
    "huggingface.co", "hf.co",
    # Hugging Face LFS storage, global and regional (``/resolve/`` redirects here), and Xet storage
    # (cas-bridge.xethub.hf.co, transfer.xethub.hf.co, ...)
    "cdn-lfs.huggingface.co", "cdn-lfs-us-1.huggingface.co", "cdn-lfs-eu-1.huggingface.co",
    "cdn-lfs.hf.co", "cdn-lfs-us-1.hf.co", "cdn-lfs-eu-1.hf.co", ".xethub.hf.co",
    # Civitai (.red is its unfiltered twin): /api/download/models/<id> answers 307 to a presigned
    # Cloudflare R2 or Backblaze B2 URL
    "civitai.com", "civitai.red", "b2.civitai.com",
    "civitai-delivery-worker-prod.5ac0637cfd0766c97916cefa3764fbdf.r2.cloudflarestorage.com",
)  # fmt: skip
#: What model-file downloads are served as (aiohttp reports a missing Content-Type as octet-stream).
DEFAULT_CONTENT_TYPES: Final = frozenset({
    "application/octet-stream", "binary/octet-stream", "application/x-binary", "application/safetensors",
    "application/x-safetensors", "application/vnd.safetensors", "application/force-download",
    "application/x-download",
})  # fmt: skip
USER_AGENT: Final = "dreamcord (self-hosted Discord bot; model import)"

# Not public even where ``is_global`` says otherwise (3.11 calls multicast and IPv4-compatible v6 global).
_BLOCKED: Final = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible form (::127.0.0.1)
        "64:ff9b:1::/48", "100::/64", "2001::/32", "2001:db8::/32", "2002::/16",  # local NAT64, Teredo, 6to4
        "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: check the embedded IPv4 address
_LOOPBACK: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
_MIME: Final = re.compile(r"[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*")
_UNSAFE_NAME: Final = re.compile(r"[^\w.()+\-\[\] ]")
_MAX_URL, _MAX_NAME = 4096, 120

# The messages (str(exc) is shown to the user as-is).
BAD_URL: Final = "That is not a valid link; paste the file's full https:// download link."
NOT_HTTPS: Final = "Only https:// links can be imported; paste the file's https:// download link."
USERINFO: Final = "Links holding a user name or password are not accepted; use the plain download link."
BAD_PORT: Final = "Links to a non-standard port are not accepted; use the site's usual https:// link."
IP_HOST: Final = "Links to a bare IP address are not accepted; use a download link from an allowed site."
NOT_ALLOWED: Final = "Imports from {host} are not allowed; the bot admin can add it to the import allow-list."
REDIRECT_REFUSED: Final = "The link redirects to a site not allowed for imports; use a direct download link."
UNRESOLVED: Final = "Could not find {host}; check the link and try again."
PRIVATE: Final = "The address of {host} is on a private or local network, which imports may not use."
TOO_MANY_REDIRECTS: Final = "The link redirects too many times; use the file's direct download link."
REDIRECT_LOOP: Final = "The link redirects in a loop; use the file's direct download link."
TOO_LARGE: Final = "The file is over the import limit of {limit}; pick a smaller file or ask the bot admin."
TOO_SLOW: Final = "The download took longer than {seconds:g} seconds; try again later or pick a smaller file."
STALLED: Final = "The download stalled (no data for {seconds:g} seconds); try again later."
CUT_OFF: Final = "The download was cut off before the end; try again later."
FAILED: Final = "The download from {host} failed; check the link or try again later."
BAD_CERT: Final = "{host} did not present a valid certificate, so the download was refused."
HTML_PAGE: Final = (
    "The link gave a web page instead of a file; Civitai does this when a download needs a login, so "
    "ask the bot admin to set a Civitai API token, or use the file's direct download link."
)
BAD_TYPE: Final = "The link gave {kind} instead of a model file; use the file's direct download link."
NEEDS_LOGIN: Final = "The site refused the download (HTTP {status}); the file may be private or need a token."
NOT_FOUND: Final = "Nothing was found at that link (HTTP 404); check the link."
HTTP_ERROR: Final = "The site answered HTTP {status} instead of the file; check the link or try again later."
EMPTY: Final = "The link gave an empty file; check the link."


@dataclass(frozen=True)
class FetchedFile:
    """A downloaded file. The caller owns ``path``: move it into storage or delete it.

    Attributes:
        path: The temporary file in ``dest_dir`` (``.import-*.part``) holding the body.
        size: Its size in bytes.
        sha256: Hex SHA-256 of the body.
        content_type: The response's media type, e.g. "application/octet-stream".
        final_url: The URL the body came from after redirects. It may carry signed query parameters:
            log or show its host only.
        filename: A safe file name suggested by the server (Content-Disposition) or the URL path.
    """

    path: Path
    size: int
    sha256: str
    content_type: str
    final_url: str
    filename: str


def host_allowed(host: str, allowed_hosts: Collection[str]) -> bool:
    """Whether ``host`` matches an allow-list entry: equal to it, or a subdomain of a "."/"*." entry."""
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*."):
            entry = entry[1:]
        if entry.startswith("."):
            if host.endswith(entry) and len(host) > len(entry):
                return True
        elif entry and host == entry:
            return True
    return False


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an IP address is globally routable: not loopback, private, link-local (the metadata
    service), CGNAT, multicast, reserved, unspecified, documentation, or an IPv6 form embedding one
    (IPv4-mapped ``::ffff:10.0.0.1``, NAT64 ``64:ff9b::a9fe:a9fe``). Unparseable input is not public.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.is_site_local:
            return False
    if any(ip.version == net.version and ip in net for net in _BLOCKED):
        return False
    special = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not (special or ip.is_unspecified)


def check_url(
    url: str | URL,
    allowed_hosts: Collection[str],
    *,
    allowed_ports: Collection[int] = (443,),
) -> URL:
    """Check a link's form and host against the allow-list (no network); return it normalised.

    Raises:
        InvalidRequestError: Not https, user info, a port not allowed, an IP-literal host, or a host
            not on the allow-list.
    """
    text = str(url).strip()
    if not text or len(text) > _MAX_URL:
        raise InvalidRequestError(BAD_URL)
    try:
        parsed = url if isinstance(url, URL) else URL(text)
        host, port = parsed.raw_host, parsed.port
    except ValueError:
        raise InvalidRequestError(BAD_URL) from None
    if parsed.scheme.lower() != "https":
        raise InvalidRequestError(NOT_HTTPS)
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise InvalidRequestError(USERINFO)
    host = (host or "").lower().rstrip(".")
    if not host:
        raise InvalidRequestError(BAD_URL)
    if port not in allowed_ports:
        raise InvalidRequestError(BAD_PORT)
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        raise InvalidRequestError(IP_HOST)
    if not host_allowed(host, allowed_hosts):
        raise InvalidRequestError(NOT_ALLOWED.format(host=host))
    return parsed.with_host(host).with_fragment(None)


def import_headers(url: str, tokens: Mapping[str, str | SecretStr]) -> dict[str, str]:
    """The ``Authorization`` header for a link, when the admin set a token for its exact host.

    Args:
        url: The link the user gave.
        tokens: Host name -> API token (``Settings.import_tokens``); names match case-insensitively,
            without subdomains (a Civitai token never goes to ``civitai.com.evil.example``).

    Returns:
        ``{"Authorization": "Bearer <token>"}``, or ``{}`` (no token for the host, or not an https link).
        :func:`fetch_to_file` sends it to that host only, never to where it redirects.
    """
    try:
        parsed = URL(str(url).strip())
        host = (parsed.raw_host or "").lower().rstrip(".")
    except ValueError:
        return {}
    if parsed.scheme.lower() != "https" or not host:
        return {}
    for name, token in tokens.items():
        if name.strip().lower().rstrip(".") == host:
            secret = token.get_secret_value() if isinstance(token, SecretStr) else token
            return {"Authorization": f"Bearer {secret}"} if secret else {}
    return {}


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (IPv4 and IPv6)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one download: answers only with the addresses already checked for a host."""

    def __init__(self) -> None:
        self.pins: dict[str, list[str]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for address in self.pins.get(host.lower().rstrip("."), []):
            ip = ipaddress.ip_address(address)
            ip_family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            if family in (socket.AF_UNSPEC, ip_family):
                results.append(
                    ResolveResult(hostname=host, host=str(ip), port=port, family=ip_family, proto=0, flags=0)
                )
        if not results:
            raise OSError(f"no checked address for {host!r}")
        return results

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class _Options:
    allowed_hosts: Collection[str]
    allowed_ports: Collection[int]
    content_types: Collection[str]
    max_bytes: int
    idle_s: float
    max_redirects: int
    headers: Mapping[str, str]
    resolver: Resolver
    ssl: ssl.SSLContext | bool
    allow_loopback: bool


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in _LOOPBACK)


async def _pin(url: URL, pins: _PinnedResolver, opts: _Options, where: str) -> None:
    """Resolve the URL's host once, refuse it unless every address is public, and pin those addresses."""
    host = url.raw_host or ""
    try:
        async with asyncio.timeout(opts.idle_s):
            addresses = [str(a).split("%", 1)[0] for a in await opts.resolver(host, url.port or 443)]
    except (OSError, TimeoutError, ValueError) as exc:
        log.info("import: cannot resolve %s: %s", host, exc)
        raise InvalidRequestError(UNRESOLVED.format(host=where)) from None
    for address in addresses:
        if not (is_public_address(address) or (opts.allow_loopback and _is_loopback(address))):
            log.warning("import: refused %s, which resolves to %s", host, address)
            raise InvalidRequestError(PRIVATE.format(host=where))
    if not addresses:
        raise InvalidRequestError(UNRESOLVED.format(host=where))
    pins.pins[host] = addresses


def _next_url(url: URL, response: aiohttp.ClientResponse, opts: _Options) -> URL:
    location = response.headers.get("Location", "")
    try:
        target = url.join(URL(location)) if location else None
    except ValueError:
        target = None
    if target is None:
        raise InvalidRequestError(HTTP_ERROR.format(status=response.status))
    try:
        return check_url(target, opts.allowed_hosts, allowed_ports=opts.allowed_ports)
    except InvalidRequestError:
        log.warning("import: refused a redirect from %s to %s", url.host, target.host)
        raise InvalidRequestError(REDIRECT_REFUSED) from None


def _check_response(response: aiohttp.ClientResponse, opts: _Options) -> None:
    status = response.status
    if status in (401, 403, 407):
        raise InvalidRequestError(NEEDS_LOGIN.format(status=status))
    if status == 404:
        raise InvalidRequestError(NOT_FOUND)
    if status != 200:
        raise InvalidRequestError(HTTP_ERROR.format(status=status))
    kind = response.content_type.lower()
    if kind in _HTML_TYPES:
        raise InvalidRequestError(HTML_PAGE)
    if kind not in opts.content_types:
        raise InvalidRequestError(BAD_TYPE.format(kind=kind if _MIME.fullmatch(kind) else "something else"))
    if response.content_length is not None and response.content_length > opts.max_bytes:
        raise InvalidRequestError(TOO_LARGE.format(limit=_human(opts.max_bytes)))


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _safe_filename(name: str | None) -> str:
    """A plain file name: no folders, controls or odd characters, at most 120 characters."""
    name = unicodedata.normalize("NFKC", name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip(" ._")
    if len(name) > _MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem[: _MAX_NAME - len(ext) - 1]}.{ext}" if dot and len(ext) <= 16 else name[:_MAX_NAME]
    return name or "download"


def _suggested_name(response: aiohttp.ClientResponse, url: URL) -> str:
    with warnings.catch_warnings():  # aiohttp warns on malformed Content-Disposition headers
        warnings.simplefilter("ignore")
        disposition = response.content_disposition
    return _safe_filename((disposition.filename if disposition else None) or url.name)


async def _stream(response: aiohttp.ClientResponse, url: URL, dest_dir: Path, opts: _Options) -> FetchedFile:
    fd, name = tempfile.mkstemp(dir=dest_dir, prefix=".import-", suffix=".part")
    path = Path(name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    async with asyncio.timeout(opts.idle_s):
                        chunk = await response.content.readany()
                except TimeoutError:
                    raise InvalidRequestError(STALLED.format(seconds=opts.idle_s)) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > opts.max_bytes:
                    raise InvalidRequestError(TOO_LARGE.format(limit=_human(opts.max_bytes)))
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise InvalidRequestError(EMPTY)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    content_type = response.content_type.lower()
    return FetchedFile(path, size, digest.hexdigest(), content_type, str(url), _suggested_name(response, url))


async def _download(url: URL, dest_dir: Path, opts: _Options) -> FetchedFile:
    pins = _PinnedResolver()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=pins, ssl=opts.ssl, use_dns_cache=False),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=opts.idle_s),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        trust_env=False,
    )
    origin = url.raw_host or ""
    seen = {url}
    async with session:
        for hop in range(opts.max_redirects + 1):
            await _pin(url, pins, opts, origin if hop == 0 else "the site the link redirects to")
            headers = opts.headers if url.raw_host == origin else {}  # a token goes to the linked host only
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(opts.idle_s):
                        request = session.get(url, headers=headers, allow_redirects=False)
                        response = await stack.enter_async_context(request)
                except TimeoutError:
                    raise InvalidRequestError(STALLED.format(seconds=opts.idle_s)) from None
                if response.status in _REDIRECTS:
                    url = _next_url(url, response, opts)
                    if url in seen:
                        raise InvalidRequestError(REDIRECT_LOOP)
                    seen.add(url)
                    continue
                _check_response(response, opts)
                return await _stream(response, url, dest_dir, opts)
    raise InvalidRequestError(TOO_MANY_REDIRECTS)


async def fetch_to_file(
    url: str,
    dest_dir: Path,
    *,
    allowed_hosts: Collection[str],
    max_bytes: int,
    timeout_s: float,
    idle_timeout_s: float = 30.0,
    max_redirects: int = 5,
    allowed_ports: Collection[int] = (443,),
    content_types: Collection[str] = DEFAULT_CONTENT_TYPES,
    headers: Mapping[str, str] | None = None,
    resolver: Resolver = system_resolver,
    ssl_context: ssl.SSLContext | None = None,
    allow_loopback: bool = False,
) -> FetchedFile:
    """Download ``url`` into a temporary file in ``dest_dir``, refusing anything unsafe (see the module).

    Args:
        url: The link the user gave.
        dest_dir: An existing folder for the temporary file (on the disk the file will be kept on).
        allowed_hosts: Host names allowed for the link and every redirect; see :func:`host_allowed`
            and :data:`DEFAULT_ALLOWED_HOSTS`.
        max_bytes: The largest body accepted.
        timeout_s: The deadline for the whole download, redirects included.
        idle_timeout_s: The longest wait for an address, a connection, headers or the next body bytes.
        max_redirects: Redirects followed at most.
        allowed_ports: Ports a link or redirect may name (443 is https' default).
        content_types: Media types accepted for the body (lower case, without parameters).
        headers: Extra request headers (``Authorization``), sent to the link's own host only.
        resolver: Resolves a host name to IP addresses; the connection uses exactly what it returns.
        ssl_context: TLS settings; None verifies certificates against the system's trust store.
        allow_loopback: Test-only: accept hosts resolving to loopback (127.0.0.0/8, ::1) so a test can
            serve on 127.0.0.1. Every other check stays on. Never set it in the bot.

    Returns:
        The file; the caller moves or deletes ``path``.

    Raises:
        InvalidRequestError: Something was refused or failed (the message says what); no file is left.
    """
    checked = check_url(url, allowed_hosts, allowed_ports=allowed_ports)
    host = checked.raw_host or ""
    opts = _Options(
        allowed_hosts, allowed_ports, content_types, max_bytes, idle_timeout_s, max_redirects,
        dict(headers or {}), resolver, ssl_context if ssl_context is not None else True, allow_loopback,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            return await _download(checked, dest_dir, opts)
    except aiohttp.ServerTimeoutError:
        raise InvalidRequestError(STALLED.format(seconds=idle_timeout_s)) from None
    except TimeoutError:
        raise InvalidRequestError(TOO_SLOW.format(seconds=timeout_s)) from None
    except aiohttp.ClientPayloadError as exc:
        log.info("import from %s cut off: %s", host, exc)
        raise InvalidRequestError(CUT_OFF) from None
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
        log.warning("import from %s: TLS failure: %s", host, exc)
        raise InvalidRequestError(BAD_CERT.format(host=host)) from None
    except aiohttp.ClientError as exc:  # the text of other errors may hold the URL: log their type only
        reason = exc if isinstance(exc, aiohttp.ClientOSError) else type(exc).__name__
        log.info("import from %s failed: %s", host, reason)
        raise InvalidRequestError(FAILED.format(host=host)) from None

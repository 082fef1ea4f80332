"""pipelines.url_import against a real local HTTPS server posing as Hugging Face, and its refusals.

The server listens on 127.0.0.1 with a certificate (made with the ``openssl`` tool) for the allow-listed
names; the test resolver maps those names to 127.0.0.1, and ``allow_loopback`` (the test-only switch)
lets that one address through. Every other check runs as in the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from pipelines import url_import as ui
from pipelines.url_import import (
    DEFAULT_ALLOWED_HOSTS,
    FetchedFile,
    fetch_to_file,
    host_allowed,
    is_public_address,
)
from storage.errors import InvalidRequestError

HF, CDN, EVIL = "huggingface.co", "cdn-lfs.huggingface.co", "evil.example"
BODY = bytes(range(256)) * 64  # 16 KiB
SECRET = "hf_SECRETTOKEN123"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MapResolver:
    """Resolves names from a table, recording each lookup; a list value is consumed one answer per call."""

    def __init__(self, table: dict[str, Sequence[str] | list[Sequence[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        answer = self.table[host]
        if answer and not isinstance(answer[0], str):  # a sequence of answers, one per lookup
            return answer.pop(0)  # type: ignore[union-attr,return-value]
        return answer  # type: ignore[return-value]


def local_resolver() -> MapResolver:
    return MapResolver({HF: ["127.0.0.1"], CDN: ["127.0.0.1"], EVIL: ["127.0.0.1"]})


# --- the server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl tool is needed to make the test server's certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    names = ",".join(f"DNS:{name}" for name in (HF, CDN, EVIL))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=dreamcord test",
         "-addext", f"subjectAltName={names}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class FakeHub:
    """Request handlers: Hugging Face-like redirects to its CDN, and every way a download can go wrong."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.port = 0
        self.seen: list[tuple[str, str, str | None]] = []  # (Host header, path, Authorization)

    def add_routes(self, app: web.Application) -> None:
        paths = {
            "/resolve/model.safetensors": self.resolve, "/relative": self.relative,
            "/off-list": self.off_list, "/downgrade": self.downgrade, "/loop-{name}": self.loop,
            "/chain/{n}": self.chain, "/blob": self.blob,
            "/files/{name}": self.plain, "/bad-name": self.bad_name, "/declared-big": self.declared_big,
            "/streamed-big": self.streamed_big, "/stall": self.stall, "/trickle": self.trickle,
            "/login": self.login, "/text": self.text, "/private": self.private, "/empty": self.empty,
        }  # fmt: skip
        for path, handler in paths.items():
            app.router.add_get(path, handler)

    def to(self, path: str, host: str = CDN, scheme: str = "https") -> web.HTTPFound:
        return web.HTTPFound(f"{scheme}://{host}:{self.port}{path}")

    async def stream(self, request: web.Request, pieces: int, size: int, delay: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        try:
            for _ in range(pieces):
                await response.write(b"x" * size)
                await asyncio.sleep(delay)
            await asyncio.wait_for(self.stop.wait(), 10)
        except (ConnectionError, TimeoutError):
            pass
        return response

    async def resolve(self, request: web.Request) -> web.Response:
        raise self.to("/blob")

    async def relative(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/blob")

    async def off_list(self, request: web.Request) -> web.Response:
        raise self.to("/blob", host=EVIL)

    async def downgrade(self, request: web.Request) -> web.Response:
        raise self.to("/blob", scheme="http")

    async def loop(self, request: web.Request) -> web.Response:
        raise self.to("/loop-b" if request.match_info["name"] == "a" else "/loop-a", host=HF)

    async def chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        raise self.to(f"/chain/{n + 1}" if n < 5 else "/blob", host=HF)

    async def blob(self, request: web.Request) -> web.Response:
        disposition = "attachment; filename=\"x.safetensors\"; filename*=UTF-8''%E7%8C%AB%20lora.safetensors"
        headers = {"Content-Disposition": disposition}
        return web.Response(body=BODY, content_type="application/octet-stream", headers=headers)

    async def plain(self, request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/octet-stream")

    async def bad_name(self, request: web.Request) -> web.Response:
        headers = {"Content-Disposition": 'attachment; filename="../../x/evil\u202e name?.safetensors"'}
        return web.Response(body=BODY, headers=headers)  # and no Content-Type at all

    async def declared_big(self, request: web.Request) -> web.StreamResponse:
        """Declares a gigabyte, sends 10 bytes and stalls: only an up-front check calls it too large."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 10**9
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await response.write(b"y" * 10)
            await asyncio.wait_for(self.stop.wait(), 10)
        return response

    async def streamed_big(self, request: web.Request) -> web.StreamResponse:
        return await self.stream(request, pieces=40, size=256, delay=0.01)

    async def stall(self, request: web.Request) -> web.StreamResponse:
        return await self.stream(request, pieces=1, size=100, delay=0)

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        return await self.stream(request, pieces=400, size=1, delay=0.05)

    async def login(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Log in to Civitai</body></html>", content_type="text/html")

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text="not a model", content_type="text/plain")

    async def private(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "Unauthorized"}, status=401)

    async def empty(self, request: web.Request) -> web.Response:
        return web.Response(body=b"", content_type="application/octet-stream")


@dataclass
class Server:
    hub: FakeHub
    client_ssl: ssl.SSLContext

    @property
    def port(self) -> int:
        return self.hub.port

    @property
    def seen(self) -> list[tuple[str, str, str | None]]:
        return self.hub.seen

    def url(self, path: str, host: str = HF) -> str:
        return f"https://{host}:{self.port}{path}"


@pytest.fixture
async def server(certificate: tuple[Path, Path]) -> AsyncIterator[Server]:
    async with serving_hub(FakeHub(asyncio.Event()), certificate) as started:
        yield started


@asynccontextmanager
async def serving_hub(hub: FakeHub, certificate: tuple[Path, Path]) -> AsyncIterator[Server]:
    """``hub``'s routes over HTTPS on 127.0.0.1 (a free port), recording every request's host, path and
    Authorization header; no access log (tests check that links' secrets reach no log)."""
    cert, key = certificate
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        hub.seen.append((request.host, request.path, request.headers.get("Authorization")))
        return await handler(request)

    app = web.Application(middlewares=[record])
    hub.add_routes(app)
    runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl).start()
    hub.port = runner.addresses[0][1]
    yield Server(hub, ssl.create_default_context(cafile=str(cert)))
    hub.stop.set()
    await runner.cleanup()


async def fetch(server: Server, url: str, dest: Path, **overrides: object) -> FetchedFile:
    options: dict[str, object] = {
        "allowed_hosts": DEFAULT_ALLOWED_HOSTS,
        "allowed_ports": (443, server.port),
        "max_bytes": 1_000_000,
        "timeout_s": 10.0,
        "idle_timeout_s": 2.0,
        "resolver": local_resolver(),
        "ssl_context": server.client_ssl,
        "allow_loopback": True,
    }
    options.update(overrides)
    return await fetch_to_file(url, dest, **options)  # type: ignore[arg-type]


async def refused(server: Server, url: str, dest: Path, **overrides: object) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        await fetch(server, url, dest, **overrides)
    assert list(dest.iterdir()) == []  # nothing left behind
    return str(caught.value)


# --- downloads ----------------------------------------------------------------------------------------


async def test_download_through_an_allowed_redirect(server: Server, tmp_path: Path) -> None:
    resolver = local_resolver()
    got = await fetch(
        server, server.url("/resolve/model.safetensors"), tmp_path, resolver=resolver,
        headers={"Authorization": f"Bearer {SECRET}"},
    )  # fmt: skip
    assert got.path.parent == tmp_path and got.path.read_bytes() == BODY
    assert got.size == len(BODY) and got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert got.content_type == "application/octet-stream"
    assert got.final_url == server.url("/blob", host=CDN)
    assert got.filename == "猫 lora.safetensors"  # filename* wins over filename, as RFC 6266 says
    # one lookup per hop; the name (not the address) reached the server, so SNI and Host kept it
    assert resolver.calls == [HF, CDN]
    assert server.seen == [
        (f"{HF}:{server.port}", "/resolve/model.safetensors", f"Bearer {SECRET}"),
        (f"{CDN}:{server.port}", "/blob", None),  # the token stays with the host the user linked
    ]


async def test_relative_redirect_and_five_redirects_are_followed(server: Server, tmp_path: Path) -> None:
    assert (await fetch(server, server.url("/relative", host=CDN), tmp_path)).path.read_bytes() == BODY
    got = await fetch(server, server.url("/chain/1"), tmp_path)  # /chain/1 ... /chain/5, /blob: 5 redirects
    assert got.final_url == server.url("/blob") and got.path.read_bytes() == BODY


async def test_file_names_are_made_safe(server: Server, tmp_path: Path) -> None:
    plain = await fetch(server, server.url("/files/model%20v2.safetensors"), tmp_path)
    assert plain.filename == "model v2.safetensors"
    got = await fetch(server, server.url("/bad-name"), tmp_path)
    assert got.filename == "evil_ name_.safetensors" and got.content_type == "application/octet-stream"


async def test_sixth_redirect_is_refused(server: Server, tmp_path: Path) -> None:
    assert await refused(server, server.url("/chain/0"), tmp_path) == ui.TOO_MANY_REDIRECTS


async def test_redirect_loop_is_refused(server: Server, tmp_path: Path) -> None:
    assert await refused(server, server.url("/loop-a"), tmp_path) == ui.REDIRECT_LOOP


async def test_redirect_off_the_allow_list_is_refused(server: Server, tmp_path: Path) -> None:
    message = await refused(server, server.url("/off-list"), tmp_path)
    assert message == ui.REDIRECT_REFUSED and EVIL not in message
    assert [path for _, path, _ in server.seen] == ["/off-list"]  # evil.example was never contacted


async def test_redirect_to_http_is_refused(server: Server, tmp_path: Path) -> None:
    assert await refused(server, server.url("/downgrade"), tmp_path) == ui.REDIRECT_REFUSED


async def test_each_hop_is_resolved_and_checked_again(server: Server, tmp_path: Path) -> None:
    """A name that answered 127.0.0.1 (allowed here) and then 10.0.0.1 is refused at the second hop."""
    rebinding = MapResolver({CDN: [["127.0.0.1"], ["10.0.0.1"]]})
    message = await refused(server, server.url("/relative", host=CDN), tmp_path, resolver=rebinding)
    assert message == ui.PRIVATE.format(host="the site the link redirects to")
    assert rebinding.calls == [CDN, CDN] and len(server.seen) == 1


async def test_size_cap_from_content_length(server: Server, tmp_path: Path) -> None:
    message = await refused(server, server.url("/declared-big"), tmp_path, max_bytes=1000, idle_timeout_s=0.5)
    assert message == ui.TOO_LARGE.format(limit="1000 bytes")


async def test_size_cap_while_streaming(server: Server, tmp_path: Path) -> None:
    message = await refused(server, server.url("/streamed-big"), tmp_path, max_bytes=1000)
    assert message == ui.TOO_LARGE.format(limit="1000 bytes")


async def test_stalled_body_hits_the_idle_timeout(server: Server, tmp_path: Path) -> None:
    message = await refused(server, server.url("/stall"), tmp_path, idle_timeout_s=0.3)
    assert message == ui.STALLED.format(seconds=0.3)


async def test_slow_endless_body_hits_the_total_timeout(server: Server, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    message = await refused(server, server.url("/trickle"), tmp_path, idle_timeout_s=0.5, timeout_s=1.0)
    assert message == ui.TOO_SLOW.format(seconds=1.0)
    assert loop.time() - start < 3


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/login", ui.HTML_PAGE),
        ("/text", ui.BAD_TYPE.format(kind="text/plain")),
        ("/private", ui.NEEDS_LOGIN.format(status=401)),
        ("/missing", ui.NOT_FOUND),
        ("/empty", ui.EMPTY),
    ],
)
async def test_wrong_answers_are_refused(server: Server, tmp_path: Path, path: str, expected: str) -> None:
    assert await refused(server, server.url(path), tmp_path) == expected


async def test_untrusted_certificate_is_refused(server: Server, tmp_path: Path) -> None:
    message = await refused(server, server.url("/blob"), tmp_path, ssl_context=ssl.create_default_context())
    assert message == ui.BAD_CERT.format(host=HF)


# --- refusals before any connection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://huggingface.co/a/resolve/main/x.safetensors", ui.NOT_HTTPS),
        ("ftp://huggingface.co/x", ui.NOT_HTTPS),
        ("file:///etc/passwd", ui.NOT_HTTPS),
        ("data:application/octet-stream;base64,AAAA", ui.NOT_HTTPS),
        ("huggingface.co/x", ui.NOT_HTTPS),
        ("https://user:hunter2@huggingface.co/x", ui.USERINFO),
        ("https://hunter2@huggingface.co/x", ui.USERINFO),
        ("https://huggingface.co:8443/x", ui.BAD_PORT),
        ("https://127.0.0.1/x", ui.IP_HOST),
        ("https://[::1]/x", ui.IP_HOST),
        ("https://169.254.169.254/latest/meta-data/", ui.IP_HOST),
        ("https://example.com/x.safetensors", ui.NOT_ALLOWED.format(host="example.com")),
        ("https://huggingface.co.evil.example/x", ui.NOT_ALLOWED.format(host="huggingface.co.evil.example")),
        ("https://2130706433/x", ui.NOT_ALLOWED.format(host="2130706433")),
        ("", ui.BAD_URL),
        ("https:///x", ui.BAD_URL),
    ],
)
async def test_links_refused_before_connecting(tmp_path: Path, url: str, expected: str) -> None:
    resolver = local_resolver()
    with pytest.raises(InvalidRequestError) as caught:
        await fetch_to_file(
            url, tmp_path, allowed_hosts=DEFAULT_ALLOWED_HOSTS, max_bytes=1000, timeout_s=5, resolver=resolver
        )
    assert str(caught.value) == expected
    assert "hunter2" not in str(caught.value)
    assert resolver.calls == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"], ["10.0.0.1"], ["172.16.5.4"], ["192.168.1.1"], ["169.254.169.254"], ["100.64.0.1"],
        ["0.0.0.0"], ["224.0.0.1"], ["::1"], ["::"], ["::ffff:127.0.0.1"], ["::ffff:169.254.169.254"],
        ["fc00::1"], ["fd12:3456::1"], ["fe80::1"], ["ff02::1"], ["64:ff9b::a9fe:a9fe"], ["::127.0.0.1"],
        ["93.184.215.14", "10.0.0.1"],  # one bad address among good ones is enough
    ],
)  # fmt: skip
async def test_hosts_resolving_to_private_addresses_are_refused(tmp_path: Path, addresses: list[str]) -> None:
    resolver = MapResolver({"civitai.com": addresses})
    url = f"https://civitai.com/api/download/models/1?token={SECRET}"
    with pytest.raises(InvalidRequestError) as caught:
        await fetch_to_file(
            url, tmp_path, allowed_hosts=DEFAULT_ALLOWED_HOSTS, max_bytes=1000, timeout_s=5, resolver=resolver
        )
    message = str(caught.value)
    assert message == ui.PRIVATE.format(host="civitai.com")
    assert SECRET not in message and not any(address in message for address in addresses)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "fe80::1"])
async def test_the_test_switch_lets_only_plain_loopback_through(tmp_path: Path, address: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await fetch_to_file(
            "https://civitai.com/x", tmp_path, allowed_hosts=DEFAULT_ALLOWED_HOSTS, max_bytes=1000,
            timeout_s=5, resolver=MapResolver({"civitai.com": [address]}), allow_loopback=True,
        )  # fmt: skip
    assert str(caught.value) == ui.PRIVATE.format(host="civitai.com")


async def test_unresolvable_host(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await fetch_to_file(
            "https://civitai.com/x", tmp_path, allowed_hosts=DEFAULT_ALLOWED_HOSTS, max_bytes=1000,
            timeout_s=5, resolver=MapResolver({}),
        )  # fmt: skip
    assert str(caught.value) == ui.UNRESOLVED.format(host="civitai.com")


# --- the pieces ---------------------------------------------------------------------------------------


def test_public_addresses() -> None:
    for address in ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::101:101", "::ffff:1.1.1.1"]:
        assert is_public_address(address), address
    for address in ["not an ip", "", "100.127.255.255", "198.18.0.1", "255.255.255.255", "2001:db8::1"]:
        assert not is_public_address(address), address


def test_allow_list_matching() -> None:
    allowed = ["huggingface.co", ".hf.co", "*.example.org", "CivitAI.com."]
    assert host_allowed("huggingface.co", allowed) and host_allowed("HuggingFace.co.", allowed)
    assert not host_allowed("cdn-lfs.huggingface.co", allowed)  # an exact entry allows no subdomain
    assert host_allowed("cdn-lfs-us-1.hf.co", allowed) and host_allowed("a.b.hf.co", allowed)
    assert not host_allowed("hf.co", allowed)  # a "." entry allows subdomains only
    assert not host_allowed("evilhf.co", allowed)
    assert host_allowed("x.example.org", allowed) and not host_allowed("example.org", allowed)
    assert host_allowed("civitai.com", allowed)
    assert not host_allowed("civitai.com.evil.example", allowed)


def test_default_allow_list_covers_the_download_hosts() -> None:
    for host in [HF, CDN, "cdn-lfs-us-1.hf.co", "cas-bridge.xethub.hf.co", "civitai.com", "b2.civitai.com"]:
        assert host_allowed(host, DEFAULT_ALLOWED_HOSTS), host
    assert not host_allowed("evil.r2.cloudflarestorage.com", DEFAULT_ALLOWED_HOSTS)

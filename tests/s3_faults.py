"""A fault-injecting HTTP proxy for S3 tests and the soak, on real sockets.

Usage: start moto's ``ThreadedMotoServer`` on 127.0.0.1, then
``with FaultProxy("http://127.0.0.1:<moto port>", seed=0) as proxy:`` and point s3fs /
aiobotocore at ``proxy.endpoint`` (``AWS_ENDPOINT_URL`` or
``client_kwargs={"endpoint_url": ...}``). Every request passes through unchanged (raw
request target, headers including the signed Host, body, keep-alive) until a rule is set:
``proxy.set_rule(rule)`` where a rule maps a :class:`Request` to a :class:`Fault` or
``None``. Faults: ``s3_error(503, "SlowDown", ...)`` answers with S3's XML error and never
forwards; ``reset()`` closes the client socket with an RST (the request is not forwarded);
``lost_response()`` forwards the request, then resets instead of answering (the write
happened, the client never hears of it); ``strip_header("If-None-Match")`` forwards without
that header (a store that ignores conditional writes); ``delay(s)`` waits, then forwards.
Ready-made rules: ``transient_mix(0.05)`` (503 SlowDown / 500 InternalError / resets),
``expired_token(only=...)``, ``strip_conditional_writes()``, ``combine(*rules)`` (first
fault wins), ``window(rule, start, stop)`` (active only for that span of seconds).
``proxy.counts`` counts faults actually injected by kind ("503 SlowDown", "reset",
"403 ExpiredToken", "strip If-None-Match", ...) and ``proxy.requests`` every request seen,
so a test or the soak can report exactly what it inflicted.

Why a proxy and not a monkeypatch: the pipeline's retry and error classification must see
what production sees (botocore parsing a real XML error, aiohttp seeing a real reset), and
a proxy injects exactly that without touching the code under test. Standard library only:
``ThreadingHTTPServer`` toward the client, one fresh ``http.client`` connection to the
upstream per request (so the proxy itself never replays a request on a stale connection).
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.client import HTTPConnection, HTTPResponse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

# Hop-by-hop headers (RFC 9110 7.6.1) are per connection: never copied across the proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# "Expect: 100-continue" is answered by this proxy itself (BaseHTTPRequestHandler does it
# for HTTP/1.1), and the body is already read when the request goes upstream.
NOT_FORWARDED = HOP_BY_HOP | {"expect"}
COPY_CHUNK = 64 * 1024
UPSTREAM_TIMEOUT_S = 120.0


class Headers(Mapping[str, str]):
    """Case-insensitive, read-only request headers (the last value of a repeated name)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = tuple(items)
        self._by_lower = {k.lower(): v for k, v in items}

    def __getitem__(self, name: str) -> str:
        return self._by_lower[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(dict((k.lower(), k) for k, _ in self._items).values())

    def __len__(self) -> int:
        return len(self._by_lower)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_lower

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


@dataclass(frozen=True)
class Request:
    """What a rule sees: the method, the URL-decoded path (``/bucket/key``), the raw query."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").partition("/")[0]

    @property
    def key(self) -> str:
        return self.path.lstrip("/").partition("/")[2]


@dataclass(frozen=True)
class Fault:
    """One fault to inject. Build with s3_error / reset / lost_response / strip_header / delay."""

    kind: str  # "error", "reset", "lost_response", "strip", "delay"
    label: str  # the key in FaultProxy.counts
    status: int = 0
    body: bytes = b""
    headers: tuple[str, ...] = ()
    seconds: float = 0.0


Rule = Callable[[Request], Fault | None]


def s3_error(status: int, code: str, message: str) -> Fault:
    """Answer with S3's XML error document; the request never reaches the store."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    return Fault(kind="error", label=f"{status} {code}", status=status, body=body)


def reset() -> Fault:
    """Close the client's socket abruptly (SO_LINGER 0 sends an RST); nothing is forwarded."""
    return Fault(kind="reset", label="reset")


def lost_response() -> Fault:
    """Forward the request, then reset the client instead of answering: a lost response.

    The store did the work (a write landed) but the client sees a connection error, so its
    retry meets its own earlier write: the case idempotent retries must recognise.
    """
    return Fault(kind="lost_response", label="lost response")


def strip_header(name: str, *more: str) -> Fault:
    """Forward without these headers (e.g. "If-None-Match") and return the real answer."""
    return Fault(kind="strip", label="strip", headers=(name, *more))


def delay(seconds: float) -> Fault:
    """Wait, then forward normally (a slow store; drives timeouts)."""
    return Fault(kind="delay", label="delay", seconds=seconds)


def transient_mix(
    rate: float,
    *,
    seed: int = 0,
    weights: Mapping[str, float] | None = None,
) -> Rule:
    """About `rate` of requests fail transiently: 503 SlowDown, 500 InternalError, resets.

    Seeded, so a run's fault pattern is repeatable for a given request order. `weights`
    picks the mix among "slowdown", "internal", "reset", "lost_response" (default
    0.4 / 0.2 / 0.4 / 0: resets before the request reaches the store).
    """
    mix = dict(weights or {"slowdown": 0.4, "internal": 0.2, "reset": 0.4})
    makers: dict[str, Callable[[], Fault]] = {
        "slowdown": lambda: s3_error(503, "SlowDown", "Please reduce your request rate."),
        "internal": lambda: s3_error(
            500, "InternalError", "We encountered an internal error. Please try again."
        ),
        "reset": reset,
        "lost_response": lost_response,
    }
    unknown = set(mix) - set(makers)
    if unknown:
        raise ValueError(f"transient_mix: unknown kinds {sorted(unknown)}; use {sorted(makers)}")
    kinds = list(mix)
    cum_weights = list(mix.values())
    rng = random.Random(seed)
    lock = threading.Lock()

    def rule(req: Request) -> Fault | None:
        with lock:
            if rng.random() >= rate:
                return None
            kind = rng.choices(kinds, weights=cum_weights)[0]
        return makers[kind]()

    return rule


def expired_token(*, only: Callable[[Request], bool] | None = None) -> Rule:
    """403 ExpiredToken, as S3 answers when session credentials run out, to matching requests."""
    fault = s3_error(403, "ExpiredToken", "The provided token has expired.")

    def rule(req: Request) -> Fault | None:
        return fault if only is None or only(req) else None

    return rule


def strip_conditional_writes() -> Rule:
    """Strip If-None-Match and If-Match from every request: a store that ignores them."""
    fault = strip_header("If-None-Match", "If-Match")
    return lambda req: fault


def combine(*rules: Rule | None) -> Rule:
    """The first rule that returns a fault wins."""
    active = [r for r in rules if r is not None]

    def rule(req: Request) -> Fault | None:
        for r in active:
            fault = r(req)
            if fault is not None:
                return fault
        return None

    return rule


def window(
    rule: Rule, start_s: float, stop_s: float, *, clock: Callable[[], float] = time.monotonic
) -> Rule:
    """`rule` applies only from `start_s` to `stop_s` seconds after this call (e.g. a token
    that expires mid-run and is renewed)."""
    t0 = clock()

    def windowed(req: Request) -> Fault | None:
        return rule(req) if start_s <= clock() - t0 < stop_s else None

    return windowed


@dataclass
class _State:
    """Shared between the handler threads: the rule, the counters, their lock."""

    upstream_host: str
    upstream_port: int
    rule: Rule | None = None
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0
    rule_errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive toward the client, as a real S3 endpoint
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: tests and the soak report counts, not access logs

    def handle_one_request(self) -> None:
        # A client that drops its connection mid-request is the client's business.
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _proxy(self) -> None:
        state = self.server.state
        body = self._read_body()
        split = urlsplit(self.path)
        req = Request(
            method=self.command,
            path=unquote(split.path),
            query=split.query,
            headers=Headers(list(self.headers.items())),
        )
        with state.lock:
            state.requests += 1
            rule = state.rule
        try:
            fault = rule(req) if rule is not None else None
        except Exception as exc:  # a broken rule must be loud, not a silent pass-through
            with state.lock:
                state.rule_errors.append(exc)
            fault = s3_error(500, "FaultProxyRuleError", f"fault rule raised {exc!r}")
        self._apply(fault, body)

    # BaseHTTPRequestHandler dispatches on do_<METHOD>; every S3 method is proxied alike.
    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _proxy

    def _apply(self, fault: Fault | None, body: bytes | None) -> None:
        drop: frozenset[str] = frozenset()
        if fault is not None and fault.kind == "strip":
            drop = frozenset(h.lower() for h in fault.headers)
            present = [h for h in fault.headers if h in self.headers]
            self._count(*(f"strip {h}" for h in present))
        elif fault is not None:
            self._count(fault.label)
        if fault is None or fault.kind == "strip":
            self._forward(body, drop=drop)
        elif fault.kind == "error":
            self._send_error_body(fault)
        elif fault.kind == "reset":
            self._reset()
        elif fault.kind == "delay":
            time.sleep(fault.seconds)
            self._forward(body)
        elif fault.kind == "lost_response":
            resp, conn = self._upstream(body, drop=frozenset())
            if resp is not None:
                resp.read()
                conn.close()
            self._reset()
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _count(self, *labels: str) -> None:
        with self.server.state.lock:
            self.server.state.counts.update(labels)

    def _read_body(self) -> bytes | None:
        """The request body with HTTP framing removed (Content-Length or chunked).

        aws-chunked is a Content-Encoding, part of the body's bytes: forwarded as is.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers: dropped, their values are in the aws-chunked body
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)  # the CRLF after each chunk
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self.rfile.read(int(length))

    def _upstream(
        self, body: bytes | None, *, drop: frozenset[str]
    ) -> tuple[HTTPResponse | None, HTTPConnection]:
        state = self.server.state
        conn = HTTPConnection(state.upstream_host, state.upstream_port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                low = name.lower()
                if low in NOT_FORWARDED or low in drop or low == "content-length":
                    continue
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            return conn.getresponse(), conn
        except OSError as exc:
            conn.close()
            self._send_error_body(s3_error(502, "FaultProxyUpstreamError", repr(exc)))
            return None, conn

    def _forward(self, body: bytes | None, *, drop: frozenset[str] = frozenset()) -> None:
        resp, conn = self._upstream(body, drop=drop)
        if resp is None:
            return
        try:
            self._relay(resp)
        finally:
            conn.close()

    def _relay(self, resp: HTTPResponse) -> None:
        """Send the upstream answer: status, headers, body streamed with its own framing."""
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        chunked = not no_body and resp.getheader("Content-Length") is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if no_body:
            return
        while chunk := resp.read(COPY_CHUNK):
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                self.wfile.write(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _send_error_body(self, fault: Fault) -> None:
        self.send_response_only(fault.status, HTTPStatus(fault.status).phrase)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(fault.body)))
        self.send_header("x-amz-request-id", "faultproxy")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(fault.body)
        self.wfile.flush()

    def _reset(self) -> None:
        """RST the client connection: SO_LINGER with a zero timeout, then close."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            return
        self.rfile.close()  # drop makefile()'s reference so close() really closes the fd
        sock.close()  # wfile writes straight to the socket and has nothing left to flush


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops SYNs when a run opens many connections

    def __init__(self, state: _State) -> None:
        self.state = state
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[no-untyped-def]
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_client_sockets(self) -> None:
        """Wake keep-alive handler threads blocked on an idle client, so close() ends them."""
        with self.sockets_lock:
            socks = list(self.open_sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1:<free port> in front of an S3 endpoint.

    A context manager; see the module docstring for rules and faults.
    """

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"FaultProxy upstream must be http://host:port, got {upstream!r}")
        self.seed = seed
        self.upstream = upstream
        self._state = _State(upstream_host=split.hostname, upstream_port=split.port or 80)
        self._server = _ProxyServer(self._state)
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"FaultProxy:{port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    def set_rule(self, rule: Rule | None) -> None:
        """Replace the active rule (None: pass everything through). Thread-safe."""
        with self._state.lock:
            self._state.rule = rule

    @property
    def counts(self) -> collections.Counter[str]:
        """Faults injected so far, by kind (a snapshot)."""
        with self._state.lock:
            return collections.Counter(self._state.counts)

    @property
    def requests(self) -> int:
        """Requests seen so far (faulted or not)."""
        with self._state.lock:
            return self._state.requests

    @property
    def rule_errors(self) -> list[BaseException]:
        """Exceptions raised by rules (each answered as a 500 FaultProxyRuleError)."""
        with self._state.lock:
            return list(self._state.rule_errors)

    def reset_counts(self) -> None:
        with self._state.lock:
            self._state.counts.clear()
            self._state.requests = 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.close_client_sockets()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

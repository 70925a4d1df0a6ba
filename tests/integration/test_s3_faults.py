"""The fault proxy (tests/s3_faults.py) does what the reliability tests and the soak rely on.

Against moto's ThreadedMotoServer with real s3fs/aiobotocore clients: requests pass through
unchanged, an injected S3 error reaches botocore with its code, a reset is a connection
error on the client, a lost response lands the write, and stripping If-None-Match turns an
exclusive create into a silent overwrite (the store behaviour issue 15 item 6 must refuse).
"""

from __future__ import annotations

import collections
import errno
import http.client
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.local_servers import moto_server
from tests.s3_faults import (
    FaultProxy,
    Request,
    combine,
    delay,
    expired_token,
    lost_response,
    reset,
    s3_error,
    strip_conditional_writes,
    strip_header,
    transient_mix,
    window,
)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def proxy(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with FaultProxy(moto_endpoint, seed=0) as p:
        yield p


def s3fs_at(endpoint: str, *, attempts: int | None = None) -> Any:
    """A fresh s3fs filesystem on `endpoint`; `attempts` caps botocore's and s3fs's retries."""
    import s3fs

    config = {"retries": {"max_attempts": attempts, "mode": "standard"}} if attempts else {}
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": endpoint}, config_kwargs=config, skip_instance_cache=True
    )
    if attempts:
        fs.retries = attempts
    return fs


def new_bucket(fs: Any) -> str:
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return bucket


def cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def req(method: str = "GET", path: str = "/b/k", **headers: str) -> Request:
    from tests.s3_faults import Headers

    return Request(method=method, path=path, query="", headers=Headers(list(headers.items())))


# --- pass-through -------------------------------------------------------------------------


@pytest.mark.slow
def test_requests_pass_through_unchanged(proxy: FaultProxy, moto_endpoint: str) -> None:
    fs = s3fs_at(proxy.endpoint)
    direct = s3fs_at(moto_endpoint)
    bucket = new_bucket(fs)
    odd = f"{bucket}/dir with space/a::b#c?d é.jpg"
    fs.pipe(odd, b"odd name")
    big = os.urandom(11 * 2**20)  # a multipart upload: POST create, 3 PUT parts, POST complete
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 2**20) as f:
        f.write(big)
    fs.pipe(f"{bucket}/empty", b"")

    assert fs.cat(odd) == direct.cat(odd) == b"odd name"
    assert fs.cat(f"{bucket}/big.bin") == direct.cat(f"{bucket}/big.bin") == big
    assert fs.cat_file(f"{bucket}/big.bin", start=5, end=10) == big[5:10]  # Range passes
    assert fs.cat(f"{bucket}/empty") == b""
    assert sorted(fs.ls(bucket, detail=False)) == sorted(direct.ls(bucket, detail=False))
    assert fs.info(f"{bucket}/big.bin")["size"] == len(big)  # HEAD keeps Content-Length
    assert proxy.requests >= 10
    assert proxy.counts == collections.Counter()


@pytest.mark.slow
def test_keep_alive_and_a_chunked_request_body(proxy: FaultProxy, moto_endpoint: str) -> None:
    bucket = new_bucket(s3fs_at(proxy.endpoint))
    host, port = proxy.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("PUT", f"/{bucket}/chunked")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for part in (b"hello ", b"chunked ", b"world"):
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    seen = proxy.requests
    for i in range(3):  # the same client connection serves the next requests
        conn.request("PUT", f"/{bucket}/plain-{i}", body=b"plain %d" % i)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    conn.close()
    assert proxy.requests == seen + 3
    direct = s3fs_at(moto_endpoint)
    assert [direct.cat(f"{bucket}/plain-{i}") for i in range(3)] == [
        b"plain 0",
        b"plain 1",
        b"plain 2",
    ]
    assert s3fs_at(moto_endpoint).cat(f"{bucket}/chunked") == b"hello chunked world"


# --- injected faults as clients see them --------------------------------------------------


@pytest.mark.slow
def test_an_injected_slowdown_reaches_botocore_as_that_code(proxy: FaultProxy) -> None:
    from botocore.exceptions import ClientError

    fs = s3fs_at(proxy.endpoint, attempts=1)
    bucket = new_bucket(fs)
    fs.pipe(f"{bucket}/k", b"x")
    slow = s3_error(503, "SlowDown", "Reduce your rate.")
    proxy.set_rule(lambda r: slow if r.method == "GET" else None)  # HEAD errors carry no body
    with pytest.raises(OSError) as info:
        fs.cat(f"{bucket}/k")
    client_errors = [e for e in cause_chain(info.value) if isinstance(e, ClientError)]
    assert client_errors, cause_chain(info.value)
    err = client_errors[0].response
    assert err["Error"]["Code"] == "SlowDown"
    assert err["Error"]["Message"] == "Reduce your rate."
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.counts["503 SlowDown"] >= 1

    proxy.set_rule(None)
    assert fs.cat(f"{bucket}/k") == b"x"  # the fault ends when the rule does


@pytest.mark.slow
def test_expired_token_is_a_403_with_s3s_code(proxy: FaultProxy) -> None:
    from botocore.exceptions import ClientError

    fs = s3fs_at(proxy.endpoint, attempts=1)
    bucket = new_bucket(fs)
    fs.pipe(f"{bucket}/read-me", b"x")
    fs.pipe(f"{bucket}/other", b"y")
    proxy.set_rule(expired_token(only=lambda r: r.method == "GET" and r.key == "read-me"))
    with pytest.raises(PermissionError) as info:  # what s3fs makes of it today (item 1)
        fs.cat(f"{bucket}/read-me")
    codes = [
        e.response["Error"]["Code"] for e in cause_chain(info.value) if isinstance(e, ClientError)
    ]
    assert codes == ["ExpiredToken"]
    assert fs.cat(f"{bucket}/other") == b"y"  # `only` limits the rule
    assert proxy.counts["403 ExpiredToken"] >= 1


@pytest.mark.slow
def test_a_reset_is_a_connection_error(proxy: FaultProxy) -> None:
    fs = s3fs_at(proxy.endpoint, attempts=1)
    bucket = new_bucket(fs)
    fs.pipe(f"{bucket}/k", b"x")
    proxy.set_rule(lambda r: reset() if r.method == "GET" else None)
    with pytest.raises(Exception) as info:
        fs.cat(f"{bucket}/k")
    chain = cause_chain(info.value)
    assert any(
        isinstance(e, ConnectionResetError) or getattr(e, "errno", None) == errno.ECONNRESET
        for e in chain
    ), chain
    assert proxy.counts["reset"] >= 1

    # On the wire it is an RST, not an orderly close: recv raises instead of returning b"".
    host, port = proxy.endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /{bucket}/k HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


@pytest.mark.slow
def test_a_lost_response_lands_the_write_but_the_client_sees_a_reset(
    proxy: FaultProxy, moto_endpoint: str
) -> None:
    fs = s3fs_at(proxy.endpoint, attempts=1)
    bucket = new_bucket(fs)
    proxy.set_rule(lambda r: lost_response() if r.method == "PUT" else None)
    with pytest.raises(Exception) as info:
        fs.pipe(f"{bucket}/written", b"landed")
    assert any(
        isinstance(e, ConnectionResetError) or getattr(e, "errno", None) == errno.ECONNRESET
        for e in cause_chain(info.value)
    )
    proxy.set_rule(None)
    assert s3fs_at(moto_endpoint).cat(f"{bucket}/written") == b"landed"
    assert proxy.counts["lost response"] >= 1


@pytest.mark.slow
def test_stripping_if_none_match_turns_exclusive_create_into_overwrite(
    proxy: FaultProxy, moto_endpoint: str
) -> None:
    direct = s3fs_at(moto_endpoint)
    bucket = new_bucket(direct)
    with direct.open(f"{bucket}/direct", "xb") as f:
        f.write(b"first")
    with pytest.raises(FileExistsError), direct.open(f"{bucket}/direct", "xb") as f:
        f.write(b"second")
    assert direct.cat(f"{bucket}/direct") == b"first"

    fs = s3fs_at(proxy.endpoint)
    proxy.set_rule(lambda r: strip_header("If-None-Match"))
    with fs.open(f"{bucket}/proxied", "xb") as f:
        f.write(b"first")
    with fs.open(f"{bucket}/proxied", "xb") as f:  # no FileExistsError: silently overwritten
        f.write(b"second")
    assert direct.cat(f"{bucket}/proxied") == b"second"
    assert proxy.counts["strip If-None-Match"] == 2

    proxy.set_rule(strip_conditional_writes())  # the ready-made rule does the same
    with fs.open(f"{bucket}/proxied", "xb") as f:
        f.write(b"third")
    assert direct.cat(f"{bucket}/proxied") == b"third"
    assert proxy.counts["strip If-None-Match"] == 3


@pytest.mark.slow
def test_a_delay_forwards_after_waiting(proxy: FaultProxy) -> None:
    import time

    fs = s3fs_at(proxy.endpoint)
    bucket = new_bucket(fs)
    fs.pipe(f"{bucket}/k", b"x")
    proxy.set_rule(lambda r: delay(0.5) if r.method == "GET" else None)
    t0 = time.monotonic()
    assert fs.cat(f"{bucket}/k") == b"x"
    assert time.monotonic() - t0 >= 0.5
    assert proxy.counts["delay"] >= 1


# --- rules (no server) --------------------------------------------------------------------


def test_transient_mix_fails_about_rate_with_every_kind_and_is_repeatable() -> None:
    rule = transient_mix(0.08, seed=3)
    faults = [rule(req()) for _ in range(20_000)]
    labels = collections.Counter(f.label for f in faults if f is not None)
    assert 0.07 < sum(labels.values()) / len(faults) < 0.09
    assert set(labels) == {"503 SlowDown", "500 InternalError", "reset"}
    again = transient_mix(0.08, seed=3)
    assert [again(req()) for _ in range(2_000)] == faults[:2_000]
    with pytest.raises(ValueError, match="unknown kinds"):
        transient_mix(0.1, weights={"meteor": 1.0})


def test_combine_takes_the_first_fault_and_window_bounds_a_rule() -> None:
    token = expired_token(only=lambda r: r.method == "GET")
    rule = combine(None, token, lambda r: s3_error(503, "SlowDown", "x"))
    get_fault = rule(req("GET"))
    put_fault = rule(req("PUT"))
    assert get_fault is not None and get_fault.label == "403 ExpiredToken"
    assert put_fault is not None and put_fault.label == "503 SlowDown"
    assert b"<Code>ExpiredToken</Code>" in get_fault.body
    assert b"The provided token has expired." in get_fault.body

    now = [0.0]
    windowed = window(expired_token(), 10.0, 20.0, clock=lambda: now[0])
    seen = []
    for t in (5.0, 10.0, 19.9, 20.0):
        now[0] = t
        seen.append(windowed(req()) is not None)
    assert seen == [False, True, True, False]


def test_request_headers_are_case_insensitive_and_path_splits_bucket_and_key() -> None:
    r = req("PUT", "/bkt/dir/a::b.jpg", **{"If-None-Match": "*"})
    assert r.headers["if-none-match"] == "*" and "IF-NONE-MATCH" in r.headers
    assert list(r.headers) == ["If-None-Match"]
    assert (r.bucket, r.key) == ("bkt", "dir/a::b.jpg")

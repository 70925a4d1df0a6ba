"""The real download path: `acquire` over HTTP from `python -m http.server` on 127.0.0.1.

Nothing is mocked between urllib and the server: fastdownload fetches the archive, acquire's
checked extraction unpacks it. The server's request log tells how many times the archive was
really fetched.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from multitag.data.datasets import DatasetError, acquire, make_shapes_dataset, pack_dataset
from tests.local_servers import free_port


@dataclass
class Server:
    base: str  # http://127.0.0.1:<port>/
    root: Path  # the folder it serves
    log: Path

    def gets(self, name: str) -> int:
        """Successful GETs of /<name> so far (http.server logs one line per request)."""
        return self.log.read_text().count(f'"GET /{name} HTTP/1.1" 200')


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"http.server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"http.server did not answer at {url} within {timeout} s")


@contextlib.contextmanager
def _serving(args: list[str], log: Path) -> Iterator[str]:
    """Run `python <args> <port>` bound to 127.0.0.1; yield its base URL; stop it after."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-u", *args, str(port)], stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/"
        _wait_until_up(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy configured in the environment must not intercept requests to 127.0.0.1."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "www"
    root.mkdir()
    log = tmp_path / "server.log"
    args = ["-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root)]
    with _serving(args, log) as base:
        yield Server(base, root, log)


# Promises 100 kB, sends 1 kB of a gzip-looking body, hangs up: a download cut off midway.
_CUT_OFF_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class CutOff(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\\x1f\\x8b" + b"0" * 1000)
        self.close_connection = True

HTTPServer(("127.0.0.1", int(sys.argv[1])), CutOff).serve_forever()
"""


@pytest.fixture
def shapes_archive(tmp_path: Path) -> tuple[Path, Path]:
    """(dataset folder, its .tgz): a tiny real shapes dataset, packed the fastai way."""
    src = make_shapes_dataset(tmp_path / "src" / "shapes", n_train=12, n_test=4, img_size=32)
    return src, pack_dataset(src, tmp_path / "packed" / "shapes.tgz")


@pytest.fixture
def untar_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from multitag.data import extraction

    real: Callable[..., Path] = extraction.extract_archive
    calls: list[str] = []

    def spy(url: str, *args: object, **kwargs: object) -> Path:
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(extraction, "extract_archive", spy)  # the step after the checks
    return calls


def _cache_files(home: Path) -> list[str]:
    """Files in the cache apart from fastdownload's config and our lock files."""
    root = home / "datasets"
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != "config.ini" and p.suffix != ".lock"
    )


def test_acquire_over_http_downloads_once_and_extracts_with_untar_data(
    server: Server, shapes_archive: tuple[Path, Path], tmp_path: Path, untar_calls: list[str]
) -> None:
    src, archive = shapes_archive
    (server.root / "shapes.tgz").write_bytes(archive.read_bytes())
    url = server.base + "shapes.tgz"
    home = tmp_path / "home"

    path = acquire(url, str(home))

    assert untar_calls == [url] and server.gets("shapes.tgz") == 1
    assert path.parent == home / "datasets" and path.name.startswith("shapes-")
    assert (path / "train.csv").read_bytes() == (src / "train.csv").read_bytes()
    assert (path / "test_labels.csv").read_bytes() == (src / "test_labels.csv").read_bytes()
    assert len(list((path / "train").glob("*.jpg"))) == 12
    assert len(list((path / "test").glob("*.jpg"))) == 4

    assert acquire(url, str(home)) == path  # cache hit: no request, no extraction
    assert server.gets("shapes.tgz") == 1 and len(untar_calls) == 1

    (path / "train.csv").unlink()  # damage is noticed; the kept archive repairs it offline
    assert acquire(url, str(home)) == path
    assert (path / "train.csv").read_bytes() == (src / "train.csv").read_bytes()
    assert server.gets("shapes.tgz") == 1 and len(untar_calls) == 2

    assert acquire(url, str(home), force=True) == path  # force fetches again
    assert server.gets("shapes.tgz") == 2


def test_http_404_is_a_clear_error_naming_the_url(server: Server, tmp_path: Path) -> None:
    url = server.base + "missing.tgz"
    home = tmp_path / "home"
    with pytest.raises(DatasetError) as err:
        acquire(url, str(home))
    msg = str(err.value)
    assert url in msg and "HTTP 404" in msg and "check that the URL" in msg
    assert not err.value.retryable
    assert _cache_files(home) == []


def test_truncated_download_leaves_nothing_and_a_retry_downloads_again(
    server: Server, shapes_archive: tuple[Path, Path], tmp_path: Path
) -> None:
    _, archive = shapes_archive
    data = archive.read_bytes()
    served = server.root / "shapes.tgz"
    served.write_bytes(data[: len(data) // 2])
    url = server.base + "shapes.tgz"
    home = tmp_path / "home"

    with pytest.raises(DatasetError) as err:
        acquire(url, str(home))
    assert url in str(err.value) and "retry" in str(err.value) and err.value.retryable
    assert _cache_files(home) == []
    assert [p.name for p in (home / "datasets").iterdir()] == [".fastai"]

    served.write_bytes(data)  # the server is fixed; the retry must fetch, not reuse the partial
    path = acquire(url, str(home))
    assert (path / "train.csv").is_file() and server.gets("shapes.tgz") == 2


def test_same_archive_name_at_two_urls_gets_two_folders(
    server: Server, tmp_path: Path, shapes_archive: tuple[Path, Path]
) -> None:
    _, archive = shapes_archive
    other_src = make_shapes_dataset(tmp_path / "other" / "shapes", n_train=6, n_test=2, img_size=32,
                                    seed=7)  # fmt: skip
    for sub, packed in (("a", archive), ("b", pack_dataset(other_src, tmp_path / "o" / "s.tgz"))):
        (server.root / sub).mkdir()
        (server.root / sub / "data.tgz").write_bytes(packed.read_bytes())
    home = tmp_path / "home"

    path_a = acquire(server.base + "a/data.tgz", str(home))
    path_b = acquire(server.base + "b/data.tgz", str(home))

    assert path_a != path_b
    assert len(list((path_a / "train").glob("*.jpg"))) == 12
    assert len(list((path_b / "train").glob("*.jpg"))) == 6


def test_download_cut_off_midway_leaves_nothing(tmp_path: Path) -> None:
    script = tmp_path / "cut_off_server.py"
    script.write_text(_CUT_OFF_SERVER)
    home = tmp_path / "home"
    with _serving([str(script)], tmp_path / "cut.log") as base:
        url = base + "shapes.tgz"
        with pytest.raises(DatasetError) as err:
            acquire(url, str(home))
    msg = str(err.value)
    assert url in msg and "retry" in msg and err.value.retryable
    assert "before the whole file arrived" in msg or "retrieval incomplete" in msg
    assert _cache_files(home) == [], "the partial download must not stay in the cache"
    assert [p.name for p in (home / "datasets").iterdir()] == [".fastai"]

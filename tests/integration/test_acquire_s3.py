"""`acquire` from s3:// against moto's S3 server, through the fault proxy (real HTTP, s3fs).

The proxy records every request, so "no new download" is counted on the wire: an unchanged
prefix costs one listing and no object GET; a changed image costs exactly its own GET.
Faults (an expired token, throttling) are injected the way S3 answers them, and must come
out as retryable DatasetErrors with nothing installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from multitag.data.datasets import MANIFEST_NAME, DatasetError, acquire, pack_dataset
from multitag.data.fingerprint import fingerprint_folder
from tests.local_servers import moto_server
from tests.s3_faults import Fault, FaultProxy, Request, expired_token, s3_error
from tests.unit.test_datasets import make_tiny_dataset

pytestmark = pytest.mark.slow  # an S3 server to start


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


class Recorder:
    """A proxy rule that records every request and injects `fault` where it says."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.fault: Callable[[Request], Fault | None] | None = None

    def __call__(self, req: Request) -> Fault | None:
        self.seen.append(req)
        return self.fault(req) if self.fault else None

    def object_gets(self, prefix: str) -> list[str]:
        """Keys read with GET under `prefix` (listings are GETs of the bucket, key '')."""
        return sorted(r.key for r in self.seen if r.method == "GET" and r.key.startswith(prefix))


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str, Recorder]]:
    """A fresh bucket; every s3fs instance (acquire's too) goes through the recording proxy."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own retries: keep faults quick
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        bucket = f"multitag-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        recorder = Recorder()
        proxy.set_rule(recorder)
        yield fs, bucket, recorder
        s3fs.S3FileSystem.clear_instance_cache()


def upload(fs: Any, src: Path, prefix: str) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        fs.pipe(f"{prefix}/{path.relative_to(src).as_posix()}", path.read_bytes())


def data_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def test_s3_folder_is_pulled_once_by_content_and_a_change_pulls_only_itself(
    s3: tuple[Any, str, Recorder], tmp_path: Path
) -> None:
    fs, bucket, rec = s3
    src = make_tiny_dataset(tmp_path / "tiny", n=6)
    upload(fs, src, f"{bucket}/data")
    home = str(tmp_path / "home")

    first = acquire(f"s3://{bucket}/data/", home)
    assert data_files(first) == data_files(src)  # identical files, byte for byte
    assert rec.object_gets("data/") == sorted(f"data/{rel}" for rel in data_files(src))

    rec.seen.clear()
    assert acquire(f"s3://{bucket}/data", home) == first
    assert rec.object_gets("data/") == []  # unchanged listing: not one object read
    assert any(r.method == "GET" and r.key == "" for r in rec.seen)  # it did list

    (src / "train" / "002.jpg").write_bytes((src / "train" / "003.jpg").read_bytes())
    fs.pipe(f"{bucket}/data/train/002.jpg", (src / "train" / "002.jpg").read_bytes())
    rec.seen.clear()
    second = acquire(f"s3://{bucket}/data", home)
    assert second != first  # a new content key
    assert data_files(second) == data_files(src)
    assert rec.object_gets("data/") == ["data/train/002.jpg"]  # only what changed
    assert fingerprint_folder(second).sha256 != fingerprint_folder(first).sha256


def test_s3_archive_is_downloaded_once_and_extracted(
    s3: tuple[Any, str, Recorder], tmp_path: Path
) -> None:
    fs, bucket, rec = s3
    src = make_tiny_dataset(tmp_path / "src" / "tiny")
    archive = pack_dataset(src, tmp_path / "tiny.tgz")
    fs.pipe(f"{bucket}/archives/tiny.tgz", archive.read_bytes())
    home = str(tmp_path / "home")

    path = acquire(f"s3://{bucket}/archives/tiny.tgz", home)
    assert data_files(path) == data_files(src)
    assert rec.object_gets("archives/") == ["archives/tiny.tgz"]
    rec.seen.clear()
    assert acquire(f"s3://{bucket}/archives/tiny.tgz", home) == path
    assert rec.object_gets("archives/") == []


@pytest.mark.parametrize(
    "fault",
    [
        expired_token(),
        lambda req: s3_error(503, "SlowDown", "Please reduce your request rate."),
    ],
    ids=["expired-token", "throttled"],
)
def test_a_failing_listing_is_retryable_and_installs_nothing(
    s3: tuple[Any, str, Recorder], tmp_path: Path, fault: Callable[[Request], Fault | None]
) -> None:
    fs, bucket, rec = s3
    upload(fs, make_tiny_dataset(tmp_path / "tiny"), f"{bucket}/data")
    home = tmp_path / "home"

    rec.fault = lambda req: fault(req) if req.method == "GET" and req.key == "" else None
    with pytest.raises(DatasetError) as err:
        acquire(f"s3://{bucket}/data", str(home))
    assert err.value.retryable, err.value
    assert "not a fact about the data" in str(err.value)
    assert (
        not (home / "datasets").exists()
        or [p.name for p in (home / "datasets").iterdir() if p.name != ".fastai"] == []
    )

    rec.fault = None  # the credentials were renewed, the store calmed down
    assert (acquire(f"s3://{bucket}/data", str(home)) / "train.csv").is_file()


def test_an_expired_token_while_downloading_is_retryable_and_installs_nothing(
    s3: tuple[Any, str, Recorder], tmp_path: Path
) -> None:
    fs, bucket, rec = s3
    src = make_tiny_dataset(tmp_path / "tiny")
    upload(fs, src, f"{bucket}/data")
    home = tmp_path / "home"

    rec.fault = expired_token(only=lambda req: req.key == "data/train/001.jpg")
    with pytest.raises(DatasetError, match=r"ExpiredToken|credential") as err:
        acquire(f"s3://{bucket}/data", str(home))
    assert err.value.retryable
    assert [p.name for p in (home / "datasets").iterdir() if p.name != ".fastai"] == []
    assert not list((home / "datasets").rglob(".tmp-*"))

    rec.fault = None
    assert data_files(acquire(f"s3://{bucket}/data", str(home))) == data_files(src)

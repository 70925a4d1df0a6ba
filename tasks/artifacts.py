"""Small helpers that turn library results into what the Prefect UI shows.

Why a module of its own: every task publishes the same few shapes (a table, a markdown page,
a link, a progress bar) and marks its run the same way (tags, library log lines); keeping the
formatting here keeps the tasks and flows a few lines each.

What a run page shows, and from where:
- artifacts keyed per dataset (`dataset_key`), so one dataset's history in the Artifacts page
  is not mixed with another's;
- progress bars (`ProgressArtifact`) a tag run moves every few hundred images and a retrain
  within each epoch, at most once per `PROGRESS_INTERVAL_S`;
- tags `model:<version>` and `dataset:<name>` (`add_run_tags`), set once they are known;
- links a person can open (`openable_url`): file:// for local paths, the cloud console for
  s3:// and gs://;
- the library's own `multitag.*` log lines (`route_library_logs`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

_KEY_RE = re.compile(r"[^a-z0-9]+")
LIBRARY_LOGGER = "multitag"
# At most one progress update per this many seconds (the last one always goes): a million
# images or a long epoch must not become thousands of API writes.
PROGRESS_INTERVAL_S = 2.0
# Called with (artifact key, percent) after every progress update sent to the API: a public
# hook for whoever wants to follow a run from Python (the tests count updates with it).
progress_listeners: list[Callable[[str, float], None]] = []


def artifact_key(*parts: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes (one at a time here)."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-")[:100]


def dataset_key(base: str, dataset: str | None) -> str:
    """`<base>-<dataset>`, sanitised: a key per dataset keeps each dataset's history apart."""
    return artifact_key(base, dataset) if dataset else artifact_key(base)


def publish_table(key: str, rows: Iterable[Mapping[str, Any]], description: str) -> None:
    create_table_artifact(
        key=artifact_key(key), table=[dict(r) for r in rows], description=description
    )


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)


def publish_link(key: str, link: str, text: str, description: str) -> None:
    create_link_artifact(key=artifact_key(key), link=link, link_text=text, description=description)


def publish_location(key: str, uri: str, description: str, *, folder: bool) -> None:
    """A link artifact a person can click for `uri` (a file or a folder), its URI as text."""
    publish_link(key, openable_url(uri, folder=folder), uri, description)


def openable_url(uri: str, *, folder: bool = False) -> str:
    """Where a browser opens `uri`: file:// for a local path, the console for s3:// and gs://.

    Why not the s3:// URI itself: a browser cannot open it; the console page lists the
    objects (a folder) or shows the object, behind the viewer's own sign-in.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":
        return Path(rest if sep else uri).resolve().as_uri()
    bucket, _, key = rest.partition("/")
    if scheme in ("s3", "s3a"):
        if folder:
            prefix = quote(key.rstrip("/") + "/" if key else "")
            return f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={prefix}"
        return f"https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={quote(key)}"
    if scheme in ("gs", "gcs"):
        return f"https://console.cloud.google.com/storage/browser/{bucket}/{quote(key)}"
    return uri  # http(s) and anything else a browser may know


def fmt(value: Any) -> Any:
    """Round floats for tables a person reads; leave everything else alone."""
    if isinstance(value, float):
        return round(value, 4)
    return value


def route_library_logs() -> None:
    """Send the library's `multitag.*` log lines (fast-path fallbacks, cache rebuilds, skipped
    shards) to the run's logs in the UI, whoever started the run.

    Why besides `PREFECT_LOGGING_EXTRA_LOGGERS=multitag` (set by the CLI, the work-pool
    templates and the images): Prefect reads that setting once, when `prefect` is first
    imported; a run started otherwise (a test, a notebook, a worker without it) would drop
    the lines. This does what the setting does, idempotently: the `prefect.extra` handlers on
    the `multitag` logger, and its level at Prefect's (the root's WARNING would hide INFO).
    """
    lib, extra = logging.getLogger(LIBRARY_LOGGER), logging.getLogger("prefect.extra")
    for handler in extra.handlers:
        if handler not in lib.handlers:
            lib.addHandler(handler)
    if lib.level == logging.NOTSET:
        lib.setLevel(extra.getEffectiveLevel())


def add_run_tags(*tags: str) -> list[str]:
    """Add `tags` to the current flow run, keeping its others; returns the run's tags.

    Why after the start and not `prefect.tags(...)` around the call: the model version is
    known only once the run resolved it (a deployment's or trigger's run starts with `model`
    unset or a name), and a deployment's run is created by the server, not by this code.
    Outside a flow run this does nothing.
    """
    run_id = flow_run.get_id()
    if not run_id:
        return []
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        merged = list(dict.fromkeys([*run.tags, *tags]))
        if merged != list(run.tags):
            client.update_flow_run(run.id, tags=merged)
    return merged


class ProgressArtifact:
    """A progress bar in the run's UI, updated at most once per `PROGRESS_INTERVAL_S`.

    `set(percent)` may be called as often as wanted (every batch); an unchanged value or one
    within the interval of the last update is not sent, unless `force` (an epoch's end, the
    run's end). Thread-safe: a retrain's training thread or a tag run's flow thread call it.
    """

    def __init__(self, key: str, description: str) -> None:
        self.key = artifact_key(key)
        self._lock = threading.Lock()
        self._sent, self._sent_at = 0.0, time.monotonic()
        # Called from a sync flow or task, Prefect's async-compatible function returns the id.
        self.id: Any = create_progress_artifact(progress=0.0, key=self.key, description=description)

    def set(self, percent: float, *, force: bool = False) -> bool:
        """Update the bar to `percent` (0-100); returns whether an update was sent."""
        percent = round(min(max(percent, 0.0), 100.0), 2)
        with self._lock:
            now = time.monotonic()
            if percent == self._sent or (not force and now - self._sent_at < PROGRESS_INTERVAL_S):
                return False
            update_progress_artifact(artifact_id=self.id, progress=percent)
            self._sent, self._sent_at = percent, now
        for listener in list(progress_listeners):
            listener(self.key, percent)
        return True


# run id -> the live progress of that tag run, in the process whose flow runs it.
_LIVE_RUNS: dict[str, TaggingProgress] = {}
_LIVE_LOCK = threading.Lock()


class TaggingProgress:
    """A tag run's images done: finished shards, plus the batches of shards in progress.

    Why: a shard is ~1,000 images; counting only finished shards would move the bar once per
    shard. Shard tasks in this process bump it per batch (`batch_callback`); the flow calls
    `publish` while it waits for shards. Shards run by Dask in other processes cannot reach
    it: those runs move per finished shard, as before.
    """

    def __init__(self, run_id: str, total: int, artifact: ProgressArtifact) -> None:
        self.run_id, self.total, self.artifact = run_id, max(total, 1), artifact
        self._finished = 0
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        with _LIVE_LOCK:
            _LIVE_RUNS[run_id] = self

    def close(self) -> None:
        """The run's shards are over: later batch callbacks for it get nothing to count."""
        with _LIVE_LOCK:
            _LIVE_RUNS.pop(self.run_id, None)

    def shard_started(self, shard_id: str) -> None:
        with self._lock:
            self._in_flight[shard_id] = 0  # a retried shard starts its count again

    def bump(self, shard_id: str, n_images: int) -> None:
        with self._lock:
            if shard_id in self._in_flight:
                self._in_flight[shard_id] += n_images

    def shard_finished(self, shard_id: str, n_images: int) -> None:
        with self._lock:
            self._in_flight.pop(shard_id, None)
            self._finished += n_images

    @property
    def done(self) -> int:
        with self._lock:
            return min(self._finished + sum(self._in_flight.values()), self.total)

    def publish(self, *, force: bool = False) -> bool:
        return self.artifact.set(100.0 * self.done / self.total, force=force)


def batch_callback(run_id: str, shard_id: str) -> Callable[[int], None] | None:
    """For a shard task: a per-batch counter into its run's progress, if the run's flow is in
    this process (threads), else None (a Dask worker: progress moves per finished shard)."""
    with _LIVE_LOCK:
        progress = _LIVE_RUNS.get(run_id)
    if progress is None:
        return None
    progress.shard_started(shard_id)

    def on_batch(n_images: int) -> None:
        progress.bump(shard_id, n_images)

    return on_batch

"""Tag a run's first images while the CLI waits for Prefect's temporary server.

Why: on a small machine `multitag tag` has its model loaded <1 s after it starts, before it
even imports Prefect (~1.4 s of one core), but Prefect's temporary server (a separate process,
on the other core) answers only after ~4 s, and the first shard task starts ~0.5-1 s after
that (with a configured server: ~2.5 s after the start). A `HeadStart` uses that wait: one
thread reads, decodes and scores the images the run's first shard will hold, in small batches.

Why exactly-once still holds: nothing is written here. `tag_shard` takes the rows of its own
URIs (`take`) and writes them with the rest of its shard, after the run has claimed them; rows
of images the plan does not give this process (already tagged, claimed by another run) are
never written. The rows come from the same `Tagger` the shard would use, so they are the rows it
would have computed. A failure here only means the shard tags those images itself.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Sequence

from multitag.inference.tagger import Tagger, TagRow

log = logging.getLogger(__name__)

# Small batches: a shard taking over waits for at most one (phone photos: ~0.2 s).
BATCH = 16
STOP_WAIT_S = 30.0  # a batch of 16 far slower than any decode: its read is stuck

_started: dict[int, HeadStart] = {}  # by id(tagger): the one head start of each tagger
_lock = threading.Lock()
_stop_at_exit: list[bool] = []  # [True] once stop_all is registered with atexit


class HeadStart:
    """Rows for the URIs `uris()` returns, computed in a background thread until stopped."""

    def __init__(self, tagger: Tagger, uris: Callable[[], Sequence[str]]) -> None:
        self.tagger = tagger
        self._uris = uris
        self._rows: dict[str, TagRow] = {}
        self._given = 0  # rows handed to shards so far
        self._stop = threading.Event()
        self.seconds = 0.0  # spent tagging (listing excluded)
        self._thread = threading.Thread(target=self._run, name="multitag-head-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            uris = self._uris()
            t0 = time.perf_counter()
            for i in range(0, len(uris), BATCH):
                if self._stop.is_set():
                    break
                for row in self.tagger.tag_batch(uris[i : i + BATCH]):
                    self._rows[row.image_uri] = row
                self.seconds = time.perf_counter() - t0
        except Exception as exc:  # the shard tags these images itself and reports any error
            log.debug("head start stopped early (%s); its shard tags the rest", exc)

    def stop(self) -> None:
        """Stop after the batch in progress; the rows computed so far stay available.

        Waits in short steps, so a shard task's timeout can land meanwhile (Prefect delivers
        it as an asynchronous exception, see `inference.tagger._polled_result`), and at most
        STOP_WAIT_S: a head start stuck on a read is left behind (a daemon thread; it stops
        after that batch) and its shard tags the images it has no rows for itself.
        """
        self._stop.set()
        deadline = time.monotonic() + STOP_WAIT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.25)
        if self._thread.is_alive():
            log.warning("head start still busy after %.0f s; its shard goes on without it",
                        STOP_WAIT_S)  # fmt: skip

    def take(self, uris: Sequence[str]) -> tuple[dict[str, TagRow], float]:
        """Stop, then hand over (and forget) the rows of `uris` that are ready, with their
        share of the seconds spent."""
        self.stop()
        computed = max(len(self._rows) + self._given, 1)
        rows = {u: self._rows.pop(u) for u in uris if u in self._rows}
        self._given += len(rows)
        return rows, self.seconds * len(rows) / computed

    @property
    def exhausted(self) -> bool:
        return not self._rows


def start(tagger: Tagger, uris: Callable[[], Sequence[str]]) -> HeadStart:
    """Start tagging `uris()` (called in the background thread) for `tagger`'s next shard."""
    with _lock:
        previous = _started.pop(id(tagger), None)
        if not _stop_at_exit:
            atexit.register(stop_all)  # never leave native code running at interpreter exit
            _stop_at_exit.append(True)
        head = _started[id(tagger)] = HeadStart(tagger, uris)
    if previous is not None:
        previous.stop()
    return head


def take(tagger: Tagger, uris: Sequence[str]) -> tuple[dict[str, TagRow], float]:
    """The ready rows of `uris` from `tagger`'s head start, and the seconds they took.

    Stops it first: once a shard runs, it has the cores. ({}, 0.0) when there is none. Rows
    of other URIs stay for the shard that holds them (shards may start in any order with
    `max_concurrency` > 1); at most one shard's worth, until this process ends.
    """
    with _lock:
        head = _started.get(id(tagger))
    if head is None:
        return {}, 0.0
    rows, seconds = head.take(uris)
    with _lock:
        if head.exhausted and _started.get(id(tagger)) is head:
            del _started[id(tagger)]
    return rows, seconds


def stop_all() -> None:
    with _lock:
        heads = list(_started.values())
        _started.clear()
    for head in heads:
        head.stop()

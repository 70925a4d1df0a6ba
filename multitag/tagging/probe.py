"""The conditional-write probe's verdict, and single-writer mode.

Exactly once rests on exclusive create (local: link(2); S3: PutObject with
`If-None-Match: *`). Some S3-compatible stores accept the header and overwrite anyway;
`storage.honours_exclusive_create` probes a store once per root and process, and a run
refuses a store that failed the probe before its first claim, unless the user says that
only one run at a time writes there (`TagParams.single_writer`, `--single-writer`).
"""

from __future__ import annotations

from multitag.config import TagParams, get_settings
from multitag.inference.faults import TaggingError
from multitag.storage import PROBE_DIR, honours_exclusive_create, join, store_description


class ConditionalWritesIgnoredError(TaggingError):
    """The output store overwrote an object created with `If-None-Match: *`.

    Exactly once rests on exclusive create; on such a store two runs could both claim an
    epoch or write a shard. Refused unless `TagParams.single_writer` says only one run writes.
    """


def check_output_store(params: TagParams) -> None:
    """Refuse the output store of `params` if it ignores exclusive create, unless
    `params.single_writer`: then only one run writes there and nothing can race."""
    if not params.single_writer:
        require_exclusive_create(params.out or get_settings(params.home).tags)


def require_exclusive_create(out_root: str) -> None:
    """Refuse an output store that overwrites on `If-None-Match: *` (probed once per root)."""
    if honours_exclusive_create(out_root):
        return
    raise ConditionalWritesIgnoredError(
        f"the output store {store_description(out_root)} does not honour exclusive create: "
        f"a probe object under {join(out_root, PROBE_DIR)} was created twice (the second "
        "PUT with `If-None-Match: *` overwrote it instead of failing), so two runs could "
        "claim or write the same images. Use a store that honours `If-None-Match: *` (AWS "
        "S3, MinIO, ...), or, if only one run at a time will ever write this output, pass "
        "--single-writer (TagParams.single_writer=True)."
    )

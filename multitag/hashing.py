"""sha256 of bytes, streams, local files and fsspec URLs: the one hashing helper.

Why one module: the registry (SHA256SUMS), the dataset cache (pinned archives), the staged
retrain files and the fast-path cache all decide whether to trust bytes by their sha256;
one implementation keeps their chunking and hex format from drifting apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from multitag.storage import fs_and_path

# 1 MiB reads: large model and archive files are hashed without being held in memory.
CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes already in memory (hash exactly what will be used)."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(f: BinaryIO, sink: BinaryIO | None = None) -> str:
    """Hex sha256 of a stream read to its end; each chunk is also written to `sink` if given.

    Why the sink: a download hashed while it is copied is checked without a second read.
    """
    digest = hashlib.sha256()
    while chunk := f.read(CHUNK_BYTES):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a local file, read in chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_uri(uri: str) -> str:
    """Hex sha256 of a file on any fsspec filesystem (a bare path is the local disk)."""
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return sha256_stream(f)

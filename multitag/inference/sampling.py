"""Decoded samples spread over a list of images: for calibrating and checking a fast path.

Why a module of its own: the export-time check (training and validation images of a dataset)
and the tag-time check (the images to tag) take their samples the same way; one helper keeps
them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from multitag.inference.imaging import DecodedImage, ImageDecodeError
from multitag.inference.reading import read_many

NO_IMAGES = np.zeros((0, 0, 0, 3), dtype=np.uint8)


def spread(items: Sequence[str], n: int) -> list[str]:
    """Up to n of `items`, evenly spread from first to last, each at most once.

    Spread, not the first n: the first files of a sorted listing are often one folder.
    """
    if not items or n <= 0:
        return []
    picks = np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def decode_spread(
    uris: Sequence[str], n: int, decode: Callable[[bytes], DecodedImage]
) -> np.ndarray:
    """Up to n images of `uris`, evenly spread, decoded by `decode` into one uint8 batch.

    Unreadable and undecodable images are skipped (a sample needs images, not error rows);
    an empty (0, 0, 0, 3) batch when none decodes.
    """
    arrays = []
    for blob in read_many(spread(uris, n)):
        if isinstance(blob, OSError):
            continue
        try:
            arrays.append(decode(blob).array)
        except ImageDecodeError:
            continue
    return np.stack(arrays) if arrays else NO_IMAGES

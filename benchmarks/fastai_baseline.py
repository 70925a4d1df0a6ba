"""What a fastai user runs to tag a folder, as one process: the end-to-end baseline.

    python -m benchmarks.fastai_baseline MODEL.pkl FOLDER OUT.parquet

`load_learner`, `learn.get_preds(dl=learn.dls.test_dl(files))`, the exported thresholds
(`loss_func.thresh`) applied, one Parquet file of labels written: the same work
`multitag tag` does, without orchestration, exactly-once bookkeeping or a fast path. Timed
from outside as a whole process, like `multitag tag`, so both pay Python's start and imports.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from fastai.vision.all import load_learner

    import multitag.training.models  # noqa: F401  (shapes_cnn, when the model is one)

    torch.set_num_threads(os.cpu_count() or 1)
    learn = load_learner(args.model, cpu=True)
    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    thresh = torch.as_tensor(learn.loss_func.thresh).float()
    vocab = list(learn.dls.vocab)
    above = (probs > thresh).numpy()
    labels = [[v for v, a in zip(vocab, row, strict=True) if a] for row in above]
    table = pa.table({"image_uri": [str(f) for f in files], "labels": labels})
    pq.write_table(table, args.out)
    print(f"{len(files)} images -> {args.out}")


if __name__ == "__main__":
    main()

"""multitag: train multi-label image classifiers and bulk-tag images.

This package is the plain library: no Prefect imports, so every piece is testable and usable
without an orchestrator. `tasks/` and `flows/` wrap it.

Subpackages, highest first; a module imports only from its own level or below (the contracts
in pyproject.toml, checked by `lint-imports`):

    tagging/     plan and claims, shards, Parquet output, drift, summary, head start
    inference/   decode, image sources, scorers, the Tagger, fast-path export and selection
    registry/    model versions, integrity, the champion pointer, loading
    training/    learner, thresholds, reports; retraining (the retrain steps) sits above
                 registry/ and inference/, the one recorded exception
    data/        data contracts, datasets (untar_data, safe extraction), the shapes generator
    config, hashing, runtime, _compat/; below them storage (fsspec I/O), then errors
"""

__version__ = "0.1.0"

"""multitag: train multi-label image classifiers and bulk-tag images.

This package is the plain library: no Prefect imports, so every piece is testable and usable
without an orchestrator. `tasks/` and `flows/` wrap it.
"""

__version__ = "0.1.0"

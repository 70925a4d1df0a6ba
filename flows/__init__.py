"""Prefect flows and the `multitag` CLI: compose tasks, hold no ML logic."""

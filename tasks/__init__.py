"""Thin Prefect @task wrappers over the `multitag` library."""

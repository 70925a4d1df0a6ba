"""Model names: which tagging task a version serves, as MLflow's registered models group versions.

Why names: one registry serves several tagging tasks (playing cards, shapes, blood smears), and
a champion is only meaningful among versions that answer the same question. A version's name
is recorded in its version.json (and metrics["name"]) at registration; the default is the
training dataset's name. Versions registered before names existed are named from
metrics["dataset"]["name"] (made a valid name), or "default" when they record no dataset
name: the same rule a new version gets, so an old registry's versions keep the names they
would have had.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from multitag.registry.errors import RegistryError
from multitag.registry.integrity import read_sums, read_verified
from multitag.registry.layout import (
    METRICS_FILE,
    VERSION_FILE,
    VERSION_RE,
    loads_json,
    version_uri,
)

DEFAULT_NAME = "default"
NAME_KEY = "name"  # in version.json and metrics.json
# A name is a folder under models/_champion/, next to the legacy chain's gen-<n>.json files
# and beside champion.json pointers: no name ends in ".json".
RESERVED_SUFFIX = ".json"


def check_model_name(name: Any) -> str:
    """`name`, if it can be a model name: plain and traversal-free, like a version id."""
    if (
        not isinstance(name, str)
        or not VERSION_RE.match(name)
        or ".." in name
        or name.endswith(RESERVED_SUFFIX)
    ):
        raise RegistryError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (at most "
            "100 characters, starting with a letter or digit, no '..', not ending in '.json')"
        )
    return name


def is_model_name(name: Any) -> bool:
    try:
        check_model_name(name)
    except RegistryError:
        return False
    return True


def default_model_name(dataset_name: Any) -> str:
    """The name a dataset's models get by default: its name, made a valid model name.

    Why sanitise rather than refuse: the dataset name is derived from a URL or file name the
    user did not choose as a model name; "default" when nothing usable is left.
    """
    if not isinstance(dataset_name, str):
        return DEFAULT_NAME
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset_name).replace("..", ".")
    name = name.removesuffix(RESERVED_SUFFIX).lstrip("._-")[:100].rstrip("._-") or DEFAULT_NAME
    return name if is_model_name(name) else DEFAULT_NAME


def name_of(record: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> str:
    """A version's name from its version.json and metrics.json (older versions: see above)."""
    for source in (record, metrics):
        name = source.get(NAME_KEY) if isinstance(source, Mapping) else None
        if is_model_name(name):
            return str(name)
    dataset = metrics.get("dataset") if isinstance(metrics, Mapping) else None
    return default_model_name(dataset.get("name") if isinstance(dataset, Mapping) else None)


def read_version_name(home: str | None, version: str, sums: Mapping[str, str] | None = None) -> str:
    """The name of a stored version, read from files checked against its SHA256SUMS."""
    vdir = version_uri(home, version)
    sums = read_sums(vdir, version) if sums is None else sums
    record = loads_json(read_verified(vdir, version, VERSION_FILE, sums), VERSION_FILE)
    if isinstance(record, Mapping) and is_model_name(record.get(NAME_KEY)):
        return str(record[NAME_KEY])
    metrics = loads_json(read_verified(vdir, version, METRICS_FILE, sums), METRICS_FILE)
    return name_of(record if isinstance(record, Mapping) else None, metrics)

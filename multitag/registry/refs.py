"""Model references: what `--model` may say, turned into one registry version id.

    (none)          the champion, when exactly one model name has one
    NAME            that name's champion
    NAME@VERSION    that version, checked to belong to NAME
    VERSION         that version

Why resolve to a version id once: a run records the version it tagged with (the Parquet
partition, the manifest) and every worker loads that same version by id, even if a
promotion moves the champion while the run goes on. A bare word that is both a version id
and a name with a champion is refused as ambiguous rather than guessed.
"""

from __future__ import annotations

from typing import NoReturn

from multitag.registry.champion import champions, get_champion
from multitag.registry.errors import NoChampionError, RegistryError, VersionNotFoundError
from multitag.registry.layout import SUMS_FILE, check_version_id, models_uri, version_uri
from multitag.registry.loading import check_champion_pointer
from multitag.registry.naming import check_model_name, is_model_name, read_version_name
from multitag.registry.versions import list_versions
from multitag.storage import exists, join

REF_SEPARATOR = "@"


def resolve_model_ref(home: str | None, ref: str | None) -> str:
    """The version id `ref` names (see the module docstring); a champion's pointer is checked
    against its version's SHA256SUMS before its id is returned.

    Errors are the input's (exit 2) and say what exists: the names that have a champion, or
    the name a version belongs to.
    """
    if not ref:
        return _only_champion(home)
    name, at, version = ref.partition(REF_SEPARATOR)
    if at:
        check_model_name(name)
        _require_complete(home, version)
        actual = read_version_name(home, version)
        if actual != name:
            raise RegistryError(
                f"model version {version} belongs to model {actual!r}, not {name!r}: use "
                f"{actual}@{version}, or `multitag models list --name {name}` for {name}'s"
            )
        return version
    is_version = _is_complete(home, ref)
    champion = get_champion(home, ref) if is_model_name(ref) else None
    if is_version and champion is not None and champion["version"] != ref:
        raise RegistryError(
            f"{ref!r} is both a model version and a model name (whose champion is "
            f"{champion['version']}): say {ref}@VERSION for a version of that name"
        )
    if is_version:
        return ref
    if champion is None:
        _raise_unknown(home, ref)
    check_champion_pointer(home, champion)
    return str(champion["version"])


def _only_champion(home: str | None) -> str:
    found = champions(home)
    if not found:
        raise NoChampionError(
            f"no champion model under {models_uri(home)}: pass --model NAME@VERSION or run "
            "`multitag retrain` first (`multitag models list` shows the versions there are)"
        )
    if len(found) > 1:
        raise RegistryError(
            f"{len(found)} model names have a champion under {models_uri(home)}: "
            f"{', '.join(sorted(found))}; choose one with --model NAME (or NAME@VERSION)"
        )
    [champion] = found.values()
    check_champion_pointer(home, champion)
    return str(champion["version"])


def _is_complete(home: str | None, version: str) -> bool:
    try:
        check_version_id(version)
    except RegistryError:
        return False
    return exists(join(version_uri(home, version), SUMS_FILE))


def _require_complete(home: str | None, version: str) -> None:
    check_version_id(version)
    if not _is_complete(home, version):
        raise VersionNotFoundError(
            f"model version {version} is not a complete version under {models_uri(home)} "
            "(`multitag models list` shows them)"
        )


def _raise_unknown(home: str | None, ref: str) -> NoReturn:
    """Why `ref` names nothing usable: no such version, or a name without a champion."""
    names = sorted(champions(home))
    shown = ", ".join(names) if names else "none yet"
    if is_model_name(ref) and _has_versions_named(home, ref):
        raise NoChampionError(
            f"model {ref!r} has versions but no champion yet: promote one with "
            f"`multitag models promote {ref}@VERSION`, or pass --model {ref}@VERSION"
        )
    raise VersionNotFoundError(
        f"{ref!r} is neither a complete model version nor a model name with a champion under "
        f"{models_uri(home)} (names with a champion: {shown}; `multitag models list` shows them)"
    )


def _has_versions_named(home: str | None, name: str) -> bool:
    # Only on the error path: it reads every version's version.json.
    return any(v.get("name") == name for v in list_versions(home))

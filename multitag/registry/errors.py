"""The registry's exceptions: what a caller can catch, and what each one means.

Exit codes (multitag.errors): a version id, metric or file the caller named that cannot be
used is the input's fault (2); stored files that fail their sha256 are a failed run (1),
because the input named a version that should have been usable.
"""

from __future__ import annotations

from multitag.errors import EXIT_FAILED, InputError


class RegistryError(InputError):
    """A registry operation cannot go ahead (bad input, missing version, bad metrics)."""


class IntegrityError(RegistryError):
    """A stored file does not match its recorded sha256, or the version cannot be verified."""

    exit_code: int = EXIT_FAILED


class IncompleteVersionError(IntegrityError):
    """The version has no SHA256SUMS: its registration never finished, so nothing is trusted."""


class VersionNotFoundError(RegistryError):
    """No folder for this version under <home>/models/."""


class VersionExistsError(RegistryError):
    """Versions are immutable: a register may not write into an existing version folder."""


class NoChampionError(RegistryError):
    """No champion.json yet: nothing to load by default."""

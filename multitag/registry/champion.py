"""The champion: the promotion chain, its compare-and-swap gate, and the decisions log.

Concurrency: registering is safe against a concurrent register of the same version id (every
file is an exclusive create). Promotion is a compare-and-swap on the chain: a promoter reads
the newest generation n, judges its candidate against that champion, and claims generation
n+1 with an exclusive create (`O_EXCL`-style link locally, `If-None-Match: *` on S3). Of two
promoters that read the same n, exactly one creates n+1; the other re-reads the chain and
judges again against the new champion, so the better model ends up champion and a decision
is recorded as promoted only when its swap won. Why a chain of exclusive creates and not an
ETag `If-Match` on champion.json: exclusive create is the one conditional write that both the
local disk and every S3 store this project supports already honour (and that the run-start
probe checks), whereas If-Match has no local-disk equivalent and S3-compatible stores vary;
one code path for both keeps the two from drifting, and the chain doubles as an audit trail.
champion.json is written after the chain step and re-pointed by whoever notices it is behind,
so readers that see a stale pointer (a promoter killed in between) are corrected by the
chain: `get_champion` follows generations past the pointer.

Names: each model name (`multitag.registry.naming`) has its own chain and pointer,
`_champion/<name>/gen-<n>.json` and `_champion/<name>/champion.json`, so a candidate is only
ever judged against its own name's champion, and only when both share a vocabulary (a model
of other labels is refused, not compared on metrics, unless forced). Legacy registries (one
global chain, `_champion/gen-<n>.json` and `models/champion.json`) keep working: that chain is
read as a fallback, and its champion counts as the champion of its version's name until the
first promotion under that name, which starts the name's chain at generation 1 (judged
against the legacy champion, recorded as its `previous`). The legacy files are never
rewritten, so an older release still reads them.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from multitag.config import BASELINE_MARGIN
from multitag.registry.errors import IntegrityError, RegistryError, VersionNotFoundError
from multitag.registry.integrity import read_sums, read_verified, verify_files
from multitag.registry.layout import (
    CHAIN_DIR,
    CHAMPION_FILE,
    DECISIONS_DIR,
    INFERENCE_FILE,
    METRICS_FILE,
    MODEL_FILE,
    check_version_id,
    iso_time,
    json_bytes,
    loads_json,
    models_uri,
    utc_now,
    version_uri,
)
from multitag.registry.naming import (
    DEFAULT_NAME,
    check_model_name,
    is_model_name,
    read_version_name,
)
from multitag.storage import fs_and_path, join, read_bytes, unstrip, write_json_atomic

_GEN_RE = re.compile(r"^gen-(\d{9,})\.json$")


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of the gate, with both numbers, as recorded in models/_decisions/."""

    promoted: bool
    reason: str
    version: str
    metric: str
    candidate_value: float | None
    champion_value: float | None
    champion_version: str | None
    forced: bool
    decided_at: str
    # The chain generation this promotion created (None when not promoted), and how many
    # times its compare-and-swap lost to a concurrent promotion before this decision.
    generation: int | None = None
    lost_swaps: int = 0
    # The candidate's own label-prior baseline for `metric` (metrics["baselines"]; None for a
    # version registered before baselines were stored, judged as before), the margin it had
    # to beat it by, and whether force promoted it although it did not.
    baseline_value: float | None = None
    baseline_margin: float | None = None
    forced_past_baseline: bool = False
    # The model name whose champion the candidate was judged against (None: older records).
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_champion(home: str | None, name: str | None = None) -> dict[str, Any] | None:
    """The champion record of model `name`, or None before its first promotion.

    The name's champion.json is read first; a promotion chain that has moved past it (its
    writer was killed, or is about to re-point it) is followed to the newest generation. A
    champion.json that disagrees with the chain record of its own generation was altered:
    IntegrityError. `name=None`: the only champion there is (None when there is none); with
    champions under several names that is ambiguous, and the RegistryError lists them.
    """
    if name is not None:
        return _chain_head(home, check_model_name(name)).record
    found = champions(home)
    if len(found) > 1:
        raise RegistryError(
            f"{len(found)} model names have a champion under {models_uri(home)}: "
            f"{', '.join(sorted(found))}; name one (--model NAME or NAME@VERSION)"
        )
    return next(iter(found.values()), None)


def champions(home: str | None) -> dict[str, dict[str, Any]]:
    """Every name's champion record, by name (a legacy chain's champion under its name)."""
    names = set()
    for uri in _json_files(join(models_uri(home), CHAIN_DIR)):
        folder = posixpath.dirname(uri)
        if posixpath.basename(posixpath.dirname(folder)) == CHAIN_DIR:
            names.add(posixpath.basename(folder))
    found = {}
    for name in sorted(n for n in names if is_model_name(n)):
        record = _chain_head(home, name).record
        if record is not None:
            found[name] = record
    legacy = _head_at(home, None).record
    if legacy is not None:
        found.setdefault(_legacy_name(home, legacy), legacy)
    return found


@dataclass(frozen=True)
class _Head:
    generation: int  # 0: no chain yet (no champion, or a champion.json from before the chain)
    record: dict[str, Any] | None


def _chain_uri(home: str | None, name: str | None, generation: int) -> str:
    """Generation n of `name`'s chain; `name=None`: the legacy global chain."""
    folder = join(models_uri(home), CHAIN_DIR) if name is None else _name_dir(home, name)
    return join(folder, f"gen-{generation:09d}.json")


def _name_dir(home: str | None, name: str) -> str:
    return join(models_uri(home), CHAIN_DIR, name)


def _pointer_uri(home: str | None, name: str | None) -> str:
    """`name`'s readable champion pointer; `name=None`: the legacy models/champion.json."""
    if name is None:
        return join(models_uri(home), CHAMPION_FILE)
    return join(_name_dir(home, name), CHAMPION_FILE)


def _read_if_present(uri: str) -> bytes | None:
    # s3fs answers exists()/info() from a cached parent listing, which would hide a
    # generation created after that listing, and its cat_file asks info() for the size
    # (max_concurrency > 1): drop the parent's cached listing first (a `find` over the
    # chains caches every name's folder).
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(posixpath.dirname(path))
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _checked_pointer(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), str) for key in ("version", "sha256")
    ):
        raise RegistryError(
            f"{where} lacks 'version' or 'sha256'; promote a version again to repair it"
        )
    return record


def _read_generation(home: str | None, name: str | None, generation: int) -> dict[str, Any] | None:
    uri = _chain_uri(home, name, generation)
    data = _read_if_present(uri)
    if data is None:
        return None
    record = _checked_pointer(loads_json(data, uri), uri)
    if record.get("generation") != generation:
        raise IntegrityError(f"{uri} records generation {record.get('generation')!r}")
    return record


def _chain_head(home: str | None, name: str) -> _Head:
    """`name`'s newest generation; before its first, the legacy champion if it is `name`'s."""
    head = _head_at(home, name)
    if head.record is None:
        legacy = _head_at(home, None).record
        if legacy is not None and _legacy_name(home, legacy) == name:
            return _Head(0, legacy)
    return head


def _legacy_name(home: str | None, record: dict[str, Any]) -> str:
    """The name the legacy chain's champion counts for: its version's name.

    A champion whose files are gone or no longer verify cannot say: it counts for "default"
    (and, not verifying, loses to any verified candidate there).
    """
    try:
        return read_version_name(home, str(record["version"]))
    except RegistryError:
        return DEFAULT_NAME


def _head_at(home: str | None, name: str | None) -> _Head:
    """The newest generation of one chain: its champion.json's, then forward while a next one
    exists (`name=None`: the legacy global chain)."""
    uri = _pointer_uri(home, name)
    data = _read_if_present(uri)
    pointer = None if data is None else _checked_pointer(loads_json(data, uri), uri)
    generation = int(pointer.get("generation") or 0) if pointer else 0
    record = pointer
    if pointer is not None and generation > 0:
        stored = _read_generation(home, name, generation)
        if stored is None or stored != pointer:
            raise IntegrityError(
                f"{uri} does not match the promotion record of its generation {generation} "
                f"({_chain_uri(home, name, generation)}): champion.json was altered after "
                "promotion, so it was not used. Run `multitag models promote NAME@VERSION` to "
                "repair it."
            )
    while (newer := _read_generation(home, name, generation + 1)) is not None:
        generation, record = generation + 1, newer
    return _Head(generation, record)


def list_decisions(home: str | None, version: str | None = None) -> list[dict[str, Any]]:
    """Recorded promotion decisions (for one version or all), oldest first.

    Promotions come from the chain (each generation's record holds its decision), the rest
    from `_decisions/`: the log of promotions is the chain itself, so it always agrees with
    the pointer, even when a promoter was killed right after its swap.
    """
    if version is not None:
        check_version_id(version)
    root = join(models_uri(home), DECISIONS_DIR)
    if version is not None:
        root = join(root, version)
    decisions = [loads_json(read_bytes(u), u) for u in _json_files(root)]
    for record in _chain_records(home):
        decision = record.get("decision")
        if isinstance(decision, dict) and version in (None, decision.get("version")):
            decisions.append(decision)
    return sorted(decisions, key=lambda d: (d.get("decided_at") or "", d.get("version") or ""))


def _json_files(root: str) -> list[str]:
    fs, path = fs_and_path(root)
    try:
        found = sorted(p for p in fs.find(path) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(path)  # a cached listing must not hide later writes (see above)
    return [unstrip(fs, p) for p in found]


def _chain_records(home: str | None) -> list[dict[str, Any]]:
    """Every generation record, oldest first."""
    found = []
    for uri in _json_files(join(models_uri(home), CHAIN_DIR)):
        match = _GEN_RE.match(posixpath.basename(uri))
        if match:
            found.append((int(match.group(1)), loads_json(read_bytes(uri), uri)))
    return [record for _, record in sorted(found, key=lambda item: item[0])]


def _metric_value(metrics: Any, metric: str, version: str) -> float:
    value = (metrics.get("validation") or {}).get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RegistryError(
            f"model version {version} has no finite validation metric {metric!r} in "
            f"{METRICS_FILE} (found {value!r}); compare on a metric both versions have, or force"
        )
    return float(value)


def _baseline_value(metrics: Any, metric: str) -> float | None:
    """The candidate's label-prior baseline for `metric`; None where none was stored."""
    baselines = metrics.get("baselines") if isinstance(metrics, dict) else None
    value = baselines.get(metric) if isinstance(baselines, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _baseline_refusal(
    candidate: float | None, baseline: float | None, margin: float, metric: str
) -> str | None:
    """Why the candidate is no better than guessing (None: it is, or there is no baseline)."""
    # Rounded: "at the margin" must not flip with float error (0.845 + 0.02 < 0.865).
    if baseline is None or (candidate is not None and round(candidate - baseline, 9) > margin):
        return None
    shown = "n/a" if candidate is None else f"{candidate:.6g}"
    return (
        f"{metric} {shown} does not beat the label-prior baseline {baseline:.6g} by the "
        f"margin {margin:.6g} (needs > {baseline + margin:.6g})"
    )


def promote_if_better(
    home: str | None,
    version: str,
    metric: str,
    force: bool = False,
    baseline_margin: float = BASELINE_MARGIN,
) -> PromotionDecision:
    """The champion gate: promote only if metrics["validation"][metric] beats the candidate's
    label-prior baseline (metrics["baselines"][metric]) by more than `baseline_margin` and
    strictly beats the champion's (higher is better; a tie keeps the champion), or there is
    no champion, or force. The baseline applies to the first model too: "no champion yet"
    does not make guessing a champion. A version without stored baselines (registered
    before they existed) is judged against the champion only, as before.

    The candidate is fully verified first (every sha256); a champion that no longer verifies
    loses to any verified candidate. The judgement and the swap are one compare-and-swap on
    the promotion chain (see the module docstring): a swap lost to a concurrent promotion is
    judged again against the champion that won, so the decision recorded is always against
    the champion the pointer actually moved from. Recorded whether or not it promotes.

    Only the champion of the candidate's own name (its version.json) is compared, and only
    when both have the same vocabulary: a candidate of other labels is refused with that
    reason, never compared on metrics, unless forced.
    """
    if "loss" in metric.lower():
        raise RegistryError(f"the gate compares higher-is-better metrics; {metric!r} is a loss")
    vdir = version_uri(home, version)
    sums = verify_files(vdir, version)
    metrics = loads_json(read_verified(vdir, version, METRICS_FILE, sums), METRICS_FILE)
    name = read_version_name(home, version, sums)
    vocab = _vocab(loads_json(read_verified(vdir, version, INFERENCE_FILE, sums), INFERENCE_FILE))
    if not (math.isfinite(baseline_margin) and 0.0 <= baseline_margin <= 1.0):
        raise RegistryError(f"baseline_margin must lie in [0, 1]; got {baseline_margin!r}")
    try:
        candidate: float | None = _metric_value(metrics, metric, version)
    except RegistryError:
        if not force:
            raise
        candidate = None
    baseline = _baseline_value(metrics, metric)
    refusal = _baseline_refusal(candidate, baseline, baseline_margin, metric)
    lost = 0
    while True:
        head = _chain_head(home, name)
        if refusal is not None and not force:
            champ = head.record
            promoted, reason = False, refusal
            champ_version, champ_value = (str(champ["version"]) if champ else None), None
        else:
            promoted, reason, champ_version, champ_value = _gate(
                home, head.record, _Candidate(name, version, vocab, candidate), metric, force
            )
            if refusal is not None and promoted:
                reason = f"forced past the baseline: {refusal}; {reason}"
        decided = utc_now()
        decision = PromotionDecision(
            promoted, reason, version, metric, candidate, champ_value, champ_version, force,
            iso_time(decided), head.generation + 1 if promoted else None, lost,
            baseline, baseline_margin if baseline is not None else None,
            promoted and refusal is not None, name,
        )  # fmt: skip
        if not promoted:
            _record_decision(home, decision, decided)
            return decision
        record = {
            "name": name,
            "version": version,
            "sha256": sums[MODEL_FILE],
            "metric": metric,
            "value": candidate,
            "promoted_at": iso_time(decided),
            "forced": force,
            "previous": champ_version,
            "generation": head.generation + 1,
            "decision": decision.to_dict(),
        }
        try:
            write_json_atomic(_chain_uri(home, name, head.generation + 1), record, exclusive=True)
        except FileExistsError:
            # A retried PUT whose first attempt landed (lost response) finds its own record.
            mine = json.loads(json_bytes(record))
            if _read_generation(home, name, head.generation + 1) != mine:
                lost += 1  # another promotion took this generation: judge again against it
                continue
        _point_champion(home, name, head.generation + 1, record)
        return decision


@dataclass(frozen=True)
class _Candidate:
    name: str
    version: str
    vocab: list[str] | None
    value: float | None


def _vocab(inference: Any) -> list[str] | None:
    vocab = inference.get("vocab") if isinstance(inference, dict) else None
    return [str(v) for v in vocab] if isinstance(vocab, list) else None


def _gate(
    home: str | None,
    champion: Mapping[str, Any] | None,
    cand: _Candidate,
    metric: str,
    force: bool,
) -> tuple[bool, str, str | None, float | None]:
    """(promote?, why, champion version, champion value) against this champion record."""
    if champion is None:
        return True, "no champion yet", None, None
    champ_version = str(champion["version"])
    if champ_version == cand.version:
        return False, f"{cand.version} is already the champion", champ_version, None
    try:
        champ_vocab, champ_metrics = _champion_files(home, champ_version)
    except (IntegrityError, VersionNotFoundError) as exc:
        return True, f"champion {champ_version} no longer verifies ({exc})", champ_version, None
    if champ_vocab != cand.vocab:
        why = (
            f"vocabulary {cand.vocab} differs from {champ_vocab} of {cand.name!r}'s champion "
            f"{champ_version}: models of different labels are not compared on {metric}"
        )
        if force:
            return True, f"forced: {why}", champ_version, None
        return False, f"{why}; promote it explicitly (force) to replace it", champ_version, None
    try:
        champ_value = _metric_value(champ_metrics, metric, champ_version)
    except RegistryError:
        if not force:
            raise
        return True, f"forced; champion {champ_version} has no {metric!r}", champ_version, None
    promoted, reason = _judge(cand.value, champ_value, metric, champ_version, force)
    return promoted, reason, champ_version, champ_value


def _point_champion(home: str | None, name: str, generation: int, record: dict[str, Any]) -> None:
    """Write champion.json, then re-point it while the chain has moved past what was written.

    Why the loop: two winners of consecutive generations may write the pointer in either
    order. Each re-checks the chain after its own write, so the last writer always leaves the
    newest generation (a kill in between leaves a stale pointer, which readers step past).
    """
    uri = _pointer_uri(home, name)
    while True:
        write_json_atomic(uri, record)
        newer = _read_generation(home, name, generation + 1)
        if newer is None:
            return
        generation, record = generation + 1, newer
        while (later := _read_generation(home, name, generation + 1)) is not None:
            generation, record = generation + 1, later


def _judge(
    candidate: float | None, champion: float, metric: str, champ_version: str | None, force: bool
) -> tuple[bool, str]:
    if candidate is not None and candidate > champion:
        return True, f"{metric} {candidate:.6g} beats champion {champ_version} ({champion:.6g})"
    shown = "n/a" if candidate is None else f"{candidate:.6g}"
    if force:
        return True, f"forced: {metric} {shown} vs champion {champ_version} ({champion:.6g})"
    return False, f"{metric} {shown} does not beat champion {champ_version} ({champion:.6g})"


def _champion_files(home: str | None, champ_version: str) -> tuple[list[str] | None, Any]:
    """The champion's vocabulary and metrics, each checked against its SHA256SUMS.

    Only these two files are hashed: they are what is compared, and a full check of the
    champion's model would download it on every retrain (load_model checks it anyway).
    """
    vdir = version_uri(home, champ_version)
    sums = read_sums(vdir, champ_version)
    inference = read_verified(vdir, champ_version, INFERENCE_FILE, sums)
    metrics = read_verified(vdir, champ_version, METRICS_FILE, sums)
    return _vocab(loads_json(inference, INFERENCE_FILE)), loads_json(metrics, METRICS_FILE)


def _record_decision(home: str | None, decision: PromotionDecision, when: datetime) -> None:
    name = f"{when:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}.json"
    uri = join(models_uri(home), DECISIONS_DIR, decision.version, name)
    write_json_atomic(uri, decision.to_dict(), exclusive=True)


def promote(home: str | None, version: str, metric: str = "mAP") -> PromotionDecision:
    """`multitag models promote [NAME@]VERSION`: make a verified version its name's champion
    whatever its score (and whatever its champion's vocabulary)."""
    return promote_if_better(home, version, metric, force=True)

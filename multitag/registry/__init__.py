"""Versioned models on any fsspec root, with sha256 integrity and a champion pointer.

Layout under `<home>/models/` (home: a local folder, `memory://...`, `s3://bucket/prefix`):

    <version>/model.pkl        exported fastai learner; a pickle, so never loaded unverified
    <version>/version.json     registry metadata: version, created_at, model sha256 and size
    <version>/thresholds.json  `ThresholdSet.to_json()`
    <version>/metrics.json     see `register_model`; the gate reads metrics["validation"][metric]
    <version>/inference.json   `training.inference_spec()`: img_size, mean, std, vocab, arch
    <version>/report.md, *.png `reports.build_model_report()` output
    <version>/fastpath.json,   optional: the CPU fast path exported at registration and its
      model.{fp32,int8}.onnx,  agreement with fp32 on validation (multitag.inference.fastpath);
      model.pt2                model.pt2 is the torch.export program a bf16 run uses
    <version>/SHA256SUMS       `<hex>  <name>` per file (sha256sum format), written LAST: its
                               presence is what marks a version complete
    _champion/<name>/champion.json  model <name>'s readable champion pointer: a copy of the
                               newest generation record below (tagging and `models list` read it)
    _champion/<name>/gen-<n>.json   <name>'s promotion chain: generation n's record (name,
                               version, sha256, metric, value, previous, the decision),
                               created exclusively
    champion.json,             the legacy global pointer and chain of registries from before
      _champion/gen-<n>.json   model names: read, never written (see `champion`)
    _decisions/<version>/<time>-<id>.json   decisions that did NOT promote (the promoted ones
                               are the chain records; `list_decisions` shows both)

Why decisions live outside the version folder: a version is immutable once written (SHA256SUMS
covers every file in it, and an unlisted file fails verification), while one version can be
judged many times.

Every version belongs to a model name (version.json "name"; default the dataset's name), and
each name has its own champion, as MLflow's registered models do.

Modules, one job each: `layout` (file names, version ids, URIs), `integrity` (SHA256SUMS and
checking files against it), `naming` (model names, a version's name), `versions` (register,
list, show), `champion` (the per-name promotion chains: compare-and-swap gate, decisions log;
its docstring explains the concurrency and legacy registries), `loading` (verified metadata
and unpickling), `refs` (NAME / NAME@VERSION / VERSION to a version id), `errors`. Import
the public API from here: `from multitag import registry; registry.load_model(...)`.
"""

from __future__ import annotations

from multitag.registry.champion import (
    PromotionDecision,
    champions,
    get_champion,
    list_decisions,
    promote,
    promote_if_better,
)
from multitag.registry.errors import (
    IncompleteVersionError,
    IntegrityError,
    NoChampionError,
    RegistryError,
    VersionExistsError,
    VersionNotFoundError,
)
from multitag.registry.integrity import format_sums, parse_sums, verify_version
from multitag.registry.layout import (
    CHAIN_DIR,
    CHAMPION_FILE,
    DECISIONS_DIR,
    FASTPATH_FILE,
    INFERENCE_FILE,
    METRICS_FILE,
    MODEL_FILE,
    REPORT_FILE,
    REQUIRED_FILES,
    SUMS_FILE,
    THRESHOLDS_FILE,
    VERSION_FILE,
    models_uri,
    new_version_id,
    version_uri,
)
from multitag.registry.loading import (
    LoadedModel,
    ModelMetadata,
    cache_dir,
    check_champion_pointer,
    load_metadata,
    load_model,
    unpickle_model,
    verified_file,
)
from multitag.registry.naming import DEFAULT_NAME, check_model_name, default_model_name
from multitag.registry.refs import resolve_model_ref
from multitag.registry.versions import list_versions, register_model, show_version

__all__ = [
    "CHAIN_DIR",
    "CHAMPION_FILE",
    "DECISIONS_DIR",
    "DEFAULT_NAME",
    "FASTPATH_FILE",
    "INFERENCE_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "REPORT_FILE",
    "REQUIRED_FILES",
    "SUMS_FILE",
    "THRESHOLDS_FILE",
    "VERSION_FILE",
    "IncompleteVersionError",
    "IntegrityError",
    "LoadedModel",
    "ModelMetadata",
    "NoChampionError",
    "PromotionDecision",
    "RegistryError",
    "VersionExistsError",
    "VersionNotFoundError",
    "cache_dir",
    "champions",
    "check_champion_pointer",
    "check_model_name",
    "default_model_name",
    "format_sums",
    "get_champion",
    "list_decisions",
    "list_versions",
    "load_metadata",
    "load_model",
    "models_uri",
    "new_version_id",
    "parse_sums",
    "promote",
    "promote_if_better",
    "register_model",
    "resolve_model_ref",
    "show_version",
    "unpickle_model",
    "verified_file",
    "verify_version",
    "version_uri",
]

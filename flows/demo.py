"""The offline demo: shapes dataset -> retrain (through untar_data) -> tag the test folder.

Why it packs the generated dataset into a .tgz first: so the demo exercises the very path a
real dataset takes (`untar_data` on an archive, safe extraction, the data contract), not a
shortcut that only the demo uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.retrain import retrain
from flows.tag import tag_images
from multitag.config import (
    DemoParams,
    RetrainParams,
    ThresholdParams,
    get_settings,
    shapes_train_params,
)
from multitag.data import datasets
from multitag.storage import join


@task(name="make-shapes-archive")
def make_shapes_archive(root: str, n_images: int, n_test: int, seed: int) -> str:
    """Generate the shapes dataset and pack it like fastai packs PASCAL_2007."""
    archive = Path(root) / f"shapes-{n_images}-{seed}.tgz"
    if archive.exists():
        return str(archive)
    src = Path(root) / "src" / "shapes"
    datasets.make_shapes_dataset(src, n_train=n_images, n_test=n_test, seed=seed)
    datasets.pack_dataset(src, archive)
    return str(archive)


@flow(name="demo", flow_run_name="demo-shapes-{params.n_images}", log_prints=True)
def demo(params: DemoParams) -> dict[str, Any]:
    home = get_settings(params.home).home
    archive = make_shapes_archive(join(home, "demo"), params.n_images, params.n_test, params.seed)
    train = shapes_train_params()
    if params.epochs:
        train = train.model_copy(update={"epochs": params.epochs})
    trained = retrain(
        RetrainParams(data=archive, train=train, thresholds=ThresholdParams(), home=home)
    )
    test_dir = str(Path(trained["dataset_dir"]) / "test")
    tagged = tag_images(source=test_dir, dataset_name="shapes-test", home=home)
    get_run_logger().info(
        "demo finished: model %s, %s images tagged", trained["version"], tagged["tagged"]
    )
    return {"retrain": trained, "tag": tagged, "home": home}


def print_demo_summary(result: dict[str, Any]) -> None:
    """What a person wants after `make demo`: where things went and what the tags look like."""
    import pyarrow.dataset as ds

    r, t = result["retrain"], result["tag"]
    models = join(result["home"], "models", r["version"])
    print("\n=== multitag demo ===")
    if r.get("reused"):  # a rerun on the same data: "no new data", the version is reused
        status = f"reused: {r['decision'].get('reason')}"
    else:
        status = "champion" if r["decision"].get("promoted") else "not promoted"
    print(f"model      : {r['version']} ({status})")
    print(f"report     : {join(models, 'report.md')}")
    print(f"tags       : {t['output']}  ({t['tagged']} tagged, {t['failed']} failed)")
    print(f"manifest   : {t['manifest']}")
    for scorer in t.get("scorers", []):
        print(f"scorer     : {scorer}")
    table = ds.dataset(t["output"], format="parquet").head(
        5, columns=["image_uri", "labels", "top_label", "top_score"]
    )
    print("\nfirst tagged rows:")
    for row in table.to_pylist():
        name = row["image_uri"].rsplit("/", 1)[-1]
        labels = ", ".join(row["labels"] or []) or "(none of these)"
        print(f"  {name:<14} {labels:<40} top={row['top_label']} {row['top_score']:.3f}")

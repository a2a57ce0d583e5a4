"""``scripts/gpu_report.py --smoke`` (what ``make gpu-report GPU_REPORT_ARGS=--smoke`` runs): every case of the GPU
report at tiny sizes on the CPU, so the report the first lent GPU runs cannot rot unseen. Times are not asserted."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run



def test_every_case_of_the_gpu_report_runs_at_tiny_size(tmp_path: Path) -> None:
    result = run("gpu_report.py", "--smoke", "--out", str(tmp_path), timeout=900)
    report = json.loads((tmp_path / "report.json").read_text())
    tables = report["tables"]
    statuses = {row["case"]: row["status"] for row in tables["cases"]}
    assert statuses and set(statuses.values()) == {"ok"}, statuses
    assert (tmp_path / "report.md").read_text() in result.stdout  # printed as written

    steps = tables["training steps"]
    variants = {(row["network"].split(" (")[0], row["variant"]) for row in steps}
    for network in ("Stage C 16-block", "Stage C 1B"):
        assert {(network, v) for v in ("eager", "compiled (aot_eager)", "fsdp2 (1 rank)")} <= variants
    assert {("Stage B", v) for v in ("eager", "channels_last", "compiled (aot_eager)")} <= variants
    assert all(row["step_ms"] > 0 and row["tflops"] > 0 for row in steps)
    # the 1B layout at its two sizes, the larger at a quarter of the batch
    sizes = {row["size"]: row["batch"] for row in steps if row["network"].startswith("Stage C 1B")
             and row["variant"] == "eager"}
    assert sizes == {"4x4": 2, "6x6": 1}

    # the training step reads one value on the host: the gradient-norm agreement
    for row in tables["host synchronisations per step"]:
        assert row["host reads"] == "1x item in distributed.py:step_health", row
    # compiled units: graphs at a bucket shape's first batch, none at its second
    for row in tables["compiled graphs per bucket shape"]:
        assert set(row["graphs at second batch"].split()) == {"0"} and row["graphs at first batch"].split()[0] != "0"
    checkpointed = {row["activation checkpointing"] for row in tables["largest batch in the memory budget"]}
    assert checkpointed == {False, True}
    kernels = {row["dropout_p"]: row for row in tables["attention kernels (forward + backward)"]}
    assert set(kernels) == {0.0, 0.1} and all(isinstance(row["math ms"], float) for row in kernels.values())
    assert {row["implementation"] for row in tables["AdamW step"]} == {"fused", "foreach", "per tensor"}
    streams = {row["stream"].split(",")[0].split(" (")[0] for row in tables["input side"]}
    assert streams == {"online Stage B", "cached Stage C"}
    assert all(row["samples_per_s"] > 0 for row in tables["input side"])


def test_the_report_skips_what_its_time_budget_leaves_no_room_for(tmp_path: Path) -> None:
    run("gpu_report.py", "--smoke", "--out", str(tmp_path), "--budget-s", "0", "--only", "c16_24_cached", "loader")
    rows = json.loads((tmp_path / "report.json").read_text())["tables"]["cases"]
    assert [row["case"] for row in rows] == ["c16_24_cached", "loader"]
    assert all(row["status"].startswith("skipped: 0 s left of the budget") for row in rows), rows

"""scripts/benchmark.py runs on CPU at the tiny preset for Stage C and B, its FLOP counts behave and its projection is
the closed form (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run


def test_benchmark_runs_and_counts_flops(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run("benchmark.py", "--preset", "tiny", "--batch", "4", "--latent", "3", "6", "--steps", "2",
                 "--warmup", "1", "--peak-tflops", "1.0", "--project", "1.42e9", "--json", str(out))
    assert "| size | data |" in result.stdout
    rows = {(r["size"], r["data"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(f"{s}x{s}", d) for s in (3, 6) for d in ("online", "cached")}
    for side in (3, 6):
        online, cached = rows[(f"{side}x{side}", "online")], rows[(f"{side}x{side}", "cached")]
        # online steps also run the compressor and the text encoder; the prior's arithmetic is the same
        assert online["gflops_per_sample"] > cached["gflops_per_sample"] > 0
        assert cached["vs_online"] is not None and online["vs_online"] == 1.0
        assert 0 < cached["mfu"] < 1
    # 4x the latent tokens: at least twice the prior's FLOPs (the 77 text tokens' share does not grow)
    assert rows[("6x6", "cached")]["gflops_per_sample"] > 2 * rows[("3x3", "cached")]["gflops_per_sample"]
    # the projection: FLOPs x samples / (312 TFLOP/s x MFU), and the measured rate's hours
    row = rows[("6x6", "cached")]
    assert row["a100_h_mfu40"] == round(row["gflops_per_sample"] * 1e9 * 1.42e9 / (312e12 * 0.4) / 3600)
    assert row["device_h"] == round(1.42e9 / row["samples_per_s"] / 3600)


def test_stage_b_benchmark_counts_what_each_data_mode_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench_b.json"
    run("benchmark.py", "--stage", "b", "--preset", "tiny", "--batch", "2", "--image", "64", "128", "--steps", "1",
        "--warmup", "0", "--json", str(out))
    rows = {(r["size"], r["data"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(f"{s}px", d) for s in (64, 128) for d in ("online", "cached", "cached_frozen")}
    for side in (64, 128):
        online, cached, frozen = (rows[(f"{side}px", d)]["gflops_per_sample"]
                                  for d in ("online", "cached", "cached_frozen"))
        # online adds Stage A's encoder and the text encoder; cached_frozen drops the compressor's forward+backward
        assert online > cached > frozen > 0
    # 4x the pixels: more than twice the decoder's FLOPs (its text and effnet conditioning do not grow)
    assert rows[("128px", "cached_frozen")]["gflops_per_sample"] > 2 * rows[("64px", "cached_frozen")][
        "gflops_per_sample"]


def test_flops_only_on_the_meta_device(tmp_path: Path) -> None:
    """--device meta counts without running: the FLOPs of a CPU step (attention there goes through the math path,
    counted matmul by matmul, on CPU through the flash kernel, counted by formula: within 2 %), no time."""
    out = tmp_path / "meta.json"
    run("benchmark.py", "--preset", "tiny", "--batch", "2", "--latent", "3", "--data", "cached", "--device", "meta",
        "--json", str(out))
    cpu = tmp_path / "cpu.json"
    run("benchmark.py", "--preset", "tiny", "--batch", "2", "--latent", "3", "--data", "cached", "--steps", "1",
        "--warmup", "0", "--json", str(cpu))
    meta_row, cpu_row = json.loads(out.read_text())["rows"][0], json.loads(cpu.read_text())["rows"][0]
    assert meta_row["gflops_per_sample"] == pytest.approx(cpu_row["gflops_per_sample"], rel=0.02)
    assert meta_row["samples_per_s"] is None and cpu_row["samples_per_s"] > 0

"""scripts/benchmark.py runs on CPU at the tiny preset and its FLOP counts behave (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run


def test_benchmark_runs_and_counts_flops(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run("benchmark.py", "--preset", "tiny", "--batch", "4", "--latent", "3", "6", "--steps", "2",
                 "--warmup", "1", "--peak-tflops", "1.0", "--json", str(out))
    assert "| latent | data |" in result.stdout
    rows = {(r["latent"], r["data"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(f"{s}x{s}", d) for s in (3, 6) for d in ("online", "cached")}
    for side in (3, 6):
        online, cached = rows[(f"{side}x{side}", "online")], rows[(f"{side}x{side}", "cached")]
        # online steps also run the compressor and the text encoder; the prior's arithmetic is the same
        assert online["gflops_per_sample"] > cached["gflops_per_sample"] > 0
        assert cached["vs_online"] is not None and online["vs_online"] == 1.0
        assert 0 < cached["mfu"] < 1
    # 4x the latent tokens: at least twice the prior's FLOPs (the 77 text tokens' share does not grow)
    assert rows[("6x6", "cached")]["gflops_per_sample"] > 2 * rows[("3x3", "cached")]["gflops_per_sample"]

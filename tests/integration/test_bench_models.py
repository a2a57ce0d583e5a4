"""scripts/bench_models.py on the tiny preset: one row per stage, every variant timed, table and json agree.

Speed is not asserted here (docs/benchmarks.md tracks it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_models.py"
TIME_KEYS = ("ours_ms", "diffusers_ms", "diffusers+sdpa_ms")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_preset_both_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script()
    out = tmp_path / "bench.json"
    rows = bench.main(["--preset", "tiny", "--stage", "both", "--warmup", "1", "--repeats", "2", "--device", "cpu",
                       "--json", str(out)])

    assert [row["stage"] for row in rows] == ["C", "B"]
    for row in rows:
        assert all(row[key] > 0 for key in TIME_KEYS)
        assert row["ratio"] > 0 and row["ratio_sdpa"] > 0
        assert {name: len(samples) for name, samples in row["samples_ms"].items()} == {
            "ours": 2, "diffusers": 2, "diffusers+sdpa": 2}
        assert row["params_M"] > 0
    # diffusers as its users get it: the prior sets the classic processor, DiffNeXt keeps Attention's SDPA default
    assert [row["diffusers_default"] for row in rows] == ["AttnProcessor", "AttnProcessor2_0"]
    assert rows[0]["latent"] == "8x8" and rows[1]["latent"] == "16x16 (effnet 8x8)"

    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert "ours/diffusers" in table[0] and "diffusers+SDPA ms" in table[0]
    assert table[2].startswith("| C |") and table[3].startswith("| B |")

    saved = json.loads(out.read_text())
    assert [row["stage"] for row in saved["rows"]] == ["C", "B"]
    assert saved["machine"]["torch"] and saved["args"]["preset"] == "tiny"


def test_rejects_a_stage_b_latent_the_unet_cannot_halve() -> None:
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--stage", "b", "--latent-b", "18", "--repeats", "1", "--warmup", "0"])

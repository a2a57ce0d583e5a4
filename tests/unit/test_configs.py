"""Every Hydra config composes and instantiates; the data check script runs on shards the test writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from wuerstchen.data import LaionFilter
from wuerstchen.data.datamodule import WebDataModule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# image shards; data=cached reads what scripts/cache_latents.py writes (tests/integration/test_cached.py)
DATA_CONFIGS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml") if "cached" not in p.stem)


def compose_check(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="check_data", overrides=overrides)


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_every_data_config_instantiates(data: str, good_shards) -> None:
    urls = str(good_shards[0].parent)
    cfg = compose_check([f"data={data}", f"data.urls={urls}", "data.val_urls=null"])
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, WebDataModule)
    assert datamodule.urls == urls
    assert datamodule.train_transform.buckets.image_size == cfg.data.image_size
    assert isinstance(datamodule.filter, LaionFilter)


def test_laion_config_needs_urls_and_keeps_official_thresholds() -> None:
    cfg = compose_check(["data=laion"])
    assert cfg.data.filter.min_size == 512 and cfg.data.filter.max_pwatermark == 0.5
    with pytest.raises(Exception, match="urls"):
        instantiate(cfg.data)
    inherited = compose_check(["data=laion_buckets", "data.urls=x"]).data
    assert instantiate(inherited.filter) == LaionFilter()
    assert inherited.image_size == 1024 and len(inherited.ratios) == 6


def test_check_data_script_reports_counts_and_writes_a_preview(good_shards, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_data.py"), f"data.urls={good_shards[0].parent}",
         "data.val_urls=null", "data.image_size=64", "data.num_workers=0", "data.batch_size=4", "num_batches=5",
         f"run_dir={run_dir}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "read 5 batches, 20 samples" in result.stdout
    assert "images (3, 64, 64), effnet_images (3, 96, 96)" in result.stdout  # synthetic data: 1.5 x views
    assert "accepted 20, rejected 0" in result.stdout
    assert (run_dir / "batch.png").stat().st_size > 0
    assert len((run_dir / "batch.txt").read_text().splitlines()) == 4

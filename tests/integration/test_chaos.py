"""Chaos: a run SIGKILLed (with its loader workers) at random moments, some inside checkpoint saves, and re-run with
the same command until it finishes, ends bitwise where an uninterrupted run ends, and every checkpoint it leaves
loads. Nothing is cleaned up by hand between the attempts: stale locks, half-written ``.partial`` checkpoints and
CSV rows of steps that were trained again after a kill are what a crashed job leaves for its next attempt."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SIZE, metric_rows, run

from wuerstchen.training.checkpointing import complete_checkpoints

pytestmark = pytest.mark.slow  # about 3 minutes on 2 cores

STEPS = 30
KILL_IN_SAVE = """
import os, runpy, signal, sys
import lightning.fabric.plugins.io.torch_io as torch_io
at = int(os.environ["KILL_IN_SAVE_AT"])
original = torch_io._atomic_save

def dying_save(checkpoint, filepath):
    if checkpoint["global_step"] == at:
        with open(filepath, "wb") as f:
            f.write(b"half a checkpoint")
        os.killpg(os.getpgrp(), signal.SIGKILL)  # the training process and its loader workers, mid-save
    original(checkpoint, filepath)

torch_io._atomic_save = dying_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def overrides(shards: Path, run_dir: Path) -> list[str]:
    return ["experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "stage.latent_scale_images=32", "stage.disc_start=10", "data.batch_size=4",
            f"data.image_size={SIZE}", f"data.urls={shards / 'train'}", f"data.val_urls={shards / 'val'}",
            "data.num_workers=2", "data.batches_per_epoch=6", "data.val_batches=1", f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.keep_last=4",
            "callbacks.preview=null", "callbacks.progress.refresh_rate=0", f"run_dir={run_dir}"]


def last_losses(run_dir: Path) -> dict[int, str]:
    """step -> loss as the newest attempt logged it (earlier attempts may have logged a step that was lost)."""
    losses: dict[int, str] = {}
    for row in metric_rows(run_dir):
        if row.get("train/loss"):
            losses[int(row["step"])] = row["train/loss"]
    return losses


def test_random_sigkills_end_where_an_uninterrupted_run_ends(shards: Path, tmp_path: Path) -> None:
    reference, chaotic = tmp_path / "reference", tmp_path / "chaotic"
    run("train.py", *overrides(shards, reference))
    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE)
    rng = random.Random(0)
    kills, finished = [], False
    for attempt in range(12):
        in_save = attempt % 2 == 1  # alternate: a kill at a random time, a kill inside a later checkpoint's save
        done = max([step for step, _ in complete_checkpoints(chaotic / "checkpoints")], default=0)
        target = done + 3 * rng.randint(1, 3)  # every_n_steps=3
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_IN_SAVE_AT": str(target if in_save else -1)}
        process = subprocess.Popen([sys.executable, str(wrapper), str(ROOT / "scripts" / "train.py"),
                                    *overrides(shards, chaotic)], cwd=ROOT, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not in_save:  # at a random moment after this attempt saved the target step
            while process.poll() is None and max([s for s, _ in complete_checkpoints(chaotic / "checkpoints")],
                                                 default=0) < target:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=600)
        if process.returncode == 0:
            finished = True
            break
        kills.append(("save" if in_save else "time", done))
        time.sleep(0.2)
    assert finished, kills
    assert len(kills) >= 3, kills  # the kills really interrupted it

    assert last_losses(chaotic) == last_losses(reference)
    left = complete_checkpoints(chaotic / "checkpoints")
    assert left[-1][0] == STEPS and not list((chaotic / "checkpoints").glob(".*.partial"))
    for _, path in left:  # every checkpoint left behind loads
        torch.load(path, weights_only=True)
    final, expected = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                       for d in (chaotic, reference))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)

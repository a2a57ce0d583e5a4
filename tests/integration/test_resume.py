"""Resume through the training entry point (``wuerstchen.train.train``, what scripts/train.py runs): N steps + resume
to 2N gives bitwise the losses and weights of an uninterrupted 2N-step run; a process killed mid-save leaves the
previous checkpoint; old checkpoints are pruned."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, common, losses_by_step, run, train_here

from wuerstchen.training.checkpointing import complete_checkpoints

STEPS = 12


def stage_overrides(stage: str, chain: dict[str, Path]) -> list[str]:
    """Tiny runs whose resume point (step 6) falls inside an epoch of 5 batches, read by 2 loader workers."""
    shared = ["data.batches_per_epoch=5", "data.num_workers=2", "callbacks.preview=null",
              "callbacks.checkpoint.keep_last=2"]
    if stage == "a":  # both optimizers, the discriminator starting between the resume point and the end
        return ["experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "stage.latent_scale_images=32", "stage.disc_start=8", "data.batch_size=4",
                "stage.codebook_restart_every=5", *shared]
    return ["experiment=demo_stage_c", "data.batch_size=8", f"stage_b_ckpt={chain['b'] / 'checkpoints' / 'last.ckpt'}",
            "stage.ema.start_step=2", *shared]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)
    flat = dict(state["state_dict"])  # the EMA copy included, as ema_network.*
    for i, optimizer in enumerate(state["optimizer_states"]):
        for param, slots in optimizer["state"].items():
            flat.update({f"opt{i}.{param}.{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    return flat


@pytest.mark.parametrize("stage", ["a", "c"])
def test_resumed_run_matches_an_uninterrupted_one_bitwise(shards: Path, chain: dict[str, Path], tmp_path: Path,
                                                         stage: str) -> None:
    extra = stage_overrides(stage, chain)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_here(*common(shards, full, STEPS, every=4), *extra)
    _, first = train_here(*common(shards, resumed, STEPS // 2, every=4), *extra)
    assert "resuming from" not in first
    _, second = train_here(*common(shards, resumed, STEPS, every=4), *extra)  # the same command, more steps
    assert f"resuming from {resumed / 'checkpoints' / 'step=0000006.ckpt'}" in second

    expected, got = losses_by_step(full), losses_by_step(resumed)
    assert sorted(expected) == list(range(STEPS)) and got == expected  # every step once, the same float
    if stage == "a":
        assert losses_by_step(resumed, "train/d_loss") == losses_by_step(full, "train/d_loss") != {}
    final_full, final_resumed = weights(full / "checkpoints" / "last.ckpt"), weights(resumed / "checkpoints" /
                                                                                      "last.ckpt")
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    # pruning keeps the newest two; last.ckpt links the newest
    assert [step for step, _ in complete_checkpoints(full / "checkpoints")] == [8, 12]
    assert os.readlink(full / "checkpoints" / "last.ckpt") == "step=0000012.ckpt"


@pytest.mark.parametrize("stage", ["a", "c"])
def test_a_resume_at_an_epochs_last_batch_is_bitwise(shards: Path, chain: dict[str, Path], tmp_path: Path,
                                                     stage: str) -> None:
    """6 batches per epoch: the checkpoint of step 6 is written at the epoch's last batch, before the epoch's
    validation pass, which the resumed run does not repeat."""
    extra = [*stage_overrides(stage, chain), "data.batches_per_epoch=6", "data.val_batches=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_here(*common(shards, full, STEPS, every=6), *extra)
    train_here(*common(shards, resumed, STEPS // 2, every=6), *extra)
    _, second = train_here(*common(shards, resumed, STEPS, every=6), *extra)
    assert f"resuming from {resumed / 'checkpoints' / 'step=0000006.ckpt'}" in second
    expected, got = losses_by_step(full), losses_by_step(resumed)
    assert sorted(expected) == list(range(STEPS)) and got == expected
    assert losses_by_step(resumed, "val/loss") == losses_by_step(full, "val/loss") != {}
    final_full, final_resumed = weights(full / "checkpoints" / "last.ckpt"), weights(resumed / "checkpoints" /
                                                                                      "last.ckpt")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


DYING_SAVE = """
import os, runpy, signal, sys
import lightning.fabric.plugins.io.torch_io as torch_io

original = torch_io._atomic_save

def dying_save(checkpoint, filepath):
    # the process is killed half-way through writing the checkpoint of step {step}
    if checkpoint["global_step"] >= {step}:
        with open(filepath, "wb") as f:
            f.write(b"half a checkpoint")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    original(checkpoint, filepath)

torch_io._atomic_save = dying_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_during_save_keeps_the_previous_checkpoint(shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    import subprocess

    extra = stage_overrides("c", chain)
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "dying_save.py"
    wrapper.write_text(DYING_SAVE.format(step=8))
    killed = subprocess.run([sys.executable, str(wrapper), str(ROOT / "scripts" / "train.py"),
                             *common(shards, run_dir, STEPS, every=4), *extra], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".step=0000008.ckpt.partial").read_bytes() == b"half a checkpoint"
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [4]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4

    _, again = train_here(*common(shards, run_dir, STEPS, every=4), *extra)
    assert f"resuming from {checkpoints / 'step=0000004.ckpt'}" in again
    assert "removing incomplete checkpoint" in again
    assert not list(checkpoints.glob(".*"))
    # keep_last=2, and the checkpoint this attempt started from (step 4) is never pruned by it
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [4, 8, 12]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == STEPS


def test_resume_false_refuses_a_run_dir_with_checkpoints(shards: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({}, checkpoints / "step=0000010.ckpt")
    with pytest.raises(ValueError, match=r"already holds checkpoints \(step=0000010.ckpt\); resume=true"):
        train_here("experiment=demo_stage_a", *common(shards, tmp_path, 4), "resume=false")


def test_a_resumed_run_continues_the_same_wandb_run(shards: Path, tmp_path: Path) -> None:
    """Two processes (in one, Lightning's WandbLogger would reuse the wandb run still open from the first)."""
    overrides = ["experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "data.batch_size=4", "logger=wandb",
                 "callbacks.preview=null", "stage.latent_scale_images=32"]
    run("train.py", *common(shards, tmp_path, 3, every=3), *overrides)
    run_id = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"]
    run("train.py", *common(shards, tmp_path, 5, every=3), *overrides)
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), (runs, run_id)  # WANDB_MODE=offline: conftest
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"] == run_id

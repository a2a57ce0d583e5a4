"""Preemption outside SLURM, as a job step sees it: the signal goes to the whole process group (training process,
its two loader workers), at different moments; the run saves one complete checkpoint, exits with 128 + the signal
(not requeued: nothing else will continue it), and re-running the same command finishes it with every step logged
exactly once. The real-Slurm requeue paths are in test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, SIZE, losses_by_step, output, train_here

from wuerstchen.training.checkpointing import complete_checkpoints

STEPS = 40


def overrides(shards: Path, run_dir: Path) -> list[str]:
    return ["experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "stage.latent_scale_images=32", "data.batch_size=4", f"data.image_size={SIZE}",
            f"data.urls={shards / 'train'}", f"data.val_urls={shards / 'val'}", "data.num_workers=2",
            "data.batches_per_epoch=6", "data.val_batches=2", f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=4", "callbacks.preview=null",
            "callbacks.progress.refresh_rate=0", f"run_dir={run_dir}"]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """scripts/train.py in a session of its own, so a signal can go to its whole process group (as Slurm's does)."""
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def wait_for_checkpoint(checkpoints: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s, _ in complete_checkpoints(checkpoints)):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint at step {step} after {timeout} s"
        time.sleep(0.2)


@pytest.mark.parametrize("signum,at_step", [(signal.SIGUSR1, 4), (signal.SIGTERM, 16)],
                         ids=["usr1-first-epoch", "term-later-epoch"])
def test_signal_to_the_process_group_saves_once_and_the_rerun_finishes(shards: Path, tmp_path: Path,
                                                                       signum: signal.Signals, at_step: int) -> None:
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir)
    process = start(args)
    wait_for_checkpoint(run_dir / "checkpoints", at_step, process)
    os.killpg(process.pid, signum)
    log = process.communicate(timeout=240)[0]
    assert process.returncode == 128 + signum, log[-3000:]
    assert "Traceback" not in log and "killed by signal" not in log, log[-3000:]
    stopped = int(log.split(f"received {signum.name}: saving at step ")[1].split()[0])
    assert at_step <= stopped < STEPS
    assert "NOT requeued" in log
    assert complete_checkpoints(run_dir / "checkpoints")[-1][0] == stopped

    result, again = train_here(*args)  # the re-run, in this process
    assert result.exit_status == 0 and f"resuming from {run_dir / 'checkpoints' / f'step={stopped:07d}.ckpt'}" in again
    assert sorted(losses_by_step(run_dir)) == list(range(STEPS))  # every step once over both runs
    assert not (run_dir / "checkpoints" / ".lock").exists()


@pytest.mark.parametrize("where", ["validation", "save", "setup"])
def test_a_signal_at_an_awkward_moment_ends_the_same_way(shards: Path, tmp_path: Path, where: str) -> None:
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SIGNAL_AT": where, "SIGNAL_HOW": "killpg", "SIGNAL_SAVE_STEP": "4"}
    process = subprocess.run([sys.executable, str(ROOT / "tests" / "signal_at.py"), str(ROOT / "scripts" / "train.py"),
                              *args], cwd=ROOT, capture_output=True, text=True, timeout=300, start_new_session=True,
                             env=env)
    log = output(process)
    assert process.returncode == 128 + signal.SIGUSR1, log[-3000:]
    assert "Traceback" not in log and "killed by signal" not in log, log[-3000:]
    if where == "setup":  # nothing has trained yet: the run stops before its first step, with nothing to save
        assert "received SIGUSR1 before the first step: stopping, nothing to save" in log
        assert complete_checkpoints(run_dir / "checkpoints") == [] and "saved checkpoint" not in log
    else:  # validation runs after step 6 (the epoch's end), the save is step 4's: both stop at the next step
        stopped = int(log.split("received SIGUSR1: saving at step ")[1].split()[0])
        assert stopped == {"validation": 7, "save": 5}[where], log[-3000:]
        assert [step for step, _ in complete_checkpoints(run_dir / "checkpoints")] == [4, stopped]
    _, again = train_here(*args)  # the re-run, in this process
    assert sorted(losses_by_step(run_dir)) == list(range(STEPS)), again[-2000:]


def test_a_missing_scontrol_is_a_failed_requeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from wuerstchen.training.preemption import requeue_slurm_job

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol on it
    assert requeue_slurm_job() is False
    assert "scontrol not found on PATH: SLURM job 4242 was not requeued" in caplog.text
    monkeypatch.delenv("SLURM_JOB_ID")
    assert requeue_slurm_job() is False and "not inside a SLURM job" in caplog.text


def test_a_signal_at_the_last_step_lets_the_run_finish(shards: Path, tmp_path: Path) -> None:
    """The signal lands in step 4's save; the next step is the last one: the run ends there, finished, exit 0."""
    run_dir = tmp_path / "run"
    args = [*overrides(shards, run_dir), "trainer.max_steps=5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SIGNAL_AT": "save", "SIGNAL_HOW": "killpg", "SIGNAL_SAVE_STEP": "4"}
    process = subprocess.run([sys.executable, str(ROOT / "tests" / "signal_at.py"), str(ROOT / "scripts" / "train.py"),
                              *args], cwd=ROOT, capture_output=True, text=True, timeout=300, start_new_session=True,
                             env=env)
    log = output(process)
    assert process.returncode == 0, log[-3000:]
    assert "NOT requeued" not in log and "received SIGUSR1" not in log
    assert complete_checkpoints(run_dir / "checkpoints")[-1][0] == 5

"""Where a run resumes (wuerstchen.training.resume): lineage, roll-backs, unreadable checkpoints, the run lock, and the
LR schedule of a resumed run whose ``max_steps`` grew."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wuerstchen.training.checkpointing import checkpoint_name, complete_checkpoints
from wuerstchen.training.optim import warmup_scheduler
from wuerstchen.training.resume import (
    RunLock,
    checkpoint_problem,
    identity,
    plan_resume,
    read_lineages,
    write_lineages,
)


def save(dirpath: Path, step: int, lineage: list[str]) -> Path:
    """A stand-in step checkpoint (a real torch.save file) recorded in the folder's lineage index."""
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / checkpoint_name(step)
    torch.save({"global_step": step, "pytorch-lightning_version": "2"}, path)
    lineages = read_lineages(dirpath)
    lineages[path.name] = lineage
    write_lineages(dirpath, lineages)
    return path


def steps(dirpath: Path) -> list[int]:
    return [step for step, _ in complete_checkpoints(dirpath)]


def test_no_ckpt_path_continues_from_the_newest(tmp_path: Path) -> None:
    save(tmp_path, 10, [])
    newest = save(tmp_path, 20, [])
    plan = plan_resume(tmp_path)
    assert plan.path == str(newest) and plan.lineage == []  # a continuation adds no start point
    assert plan_resume(tmp_path / "empty").path is None


def test_ckpt_path_starts_the_first_attempt_and_later_ones_continue_its_branch(tmp_path: Path) -> None:
    source = save(tmp_path / "pretrain", 1000, [])
    run = tmp_path / "finetune"
    first = plan_resume(run, str(source))
    assert first.path == str(source) and first.lineage == [identity(source)]
    save(run, 1100, first.lineage)  # what the first attempt wrote before it was requeued
    newest = save(run, 1200, first.lineage)
    again = plan_resume(run, str(source))  # the requeued attempt runs the same command
    assert again.path == str(newest) and again.lineage == [identity(source)]
    assert steps(run) == [1100, 1200] and again.moved_aside == []
    # the pretraining run pruned its checkpoint meanwhile: the next requeue still continues the fine-tune
    source.unlink()
    assert plan_resume(run, str(source)).path == str(newest)


def test_naming_a_checkpoint_the_run_merely_resumed_from_rolls_back(tmp_path: Path) -> None:
    save(tmp_path, 10, [])
    resumed_from = save(tmp_path, 20, [])
    save(tmp_path, 30, [])  # written by an attempt that resumed from step 20 without ckpt_path
    os.symlink(checkpoint_name(30), tmp_path / "last.ckpt")
    plan = plan_resume(tmp_path, str(resumed_from))
    assert plan.path == str(resumed_from) and steps(tmp_path) == [10, 20]
    assert [Path(p).name for p in plan.moved_aside] == [checkpoint_name(30)]
    assert os.readlink(tmp_path / "last.ckpt") == checkpoint_name(20)  # no dangling link after the move


def test_later_checkpoints_without_a_lineage_record_are_not_rolled_back_silently(tmp_path: Path) -> None:
    start = save(tmp_path, 10, [])
    torch.save({"global_step": 20, "pytorch-lightning_version": "2"}, tmp_path / checkpoint_name(20))  # no record
    with pytest.raises(RuntimeError, match="no lineage record"):
        plan_resume(tmp_path, str(start))
    assert steps(tmp_path) == [10, 20]


def test_rolling_back_moves_the_abandoned_branch_aside(tmp_path: Path) -> None:
    start = save(tmp_path, 10, [])
    for step in (20, 30, 40):
        save(tmp_path, step, [identity(start)])
    rollback = tmp_path / checkpoint_name(20)
    plan = plan_resume(tmp_path, str(rollback))
    assert plan.path == str(rollback) and plan.lineage == [identity(start), identity(rollback)]
    assert steps(tmp_path) == [10, 20]
    moved = sorted(Path(p).name for p in plan.moved_aside)
    assert moved == [checkpoint_name(30), checkpoint_name(40)]
    assert all(Path(p).is_file() and Path(p).parent.name.startswith("abandoned-") for p in plan.moved_aside)
    # the new branch's checkpoints descend from the roll-back point: re-running the same command continues them
    newest = save(tmp_path, 25, plan.lineage)
    assert plan_resume(tmp_path, str(rollback)).path == str(newest)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    good = save(tmp_path, 10, [])
    bad = save(tmp_path, 20, [])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a node crashed while the file was being written out
    assert checkpoint_problem(good) is None and checkpoint_problem(bad) is not None
    plan = plan_resume(tmp_path)
    assert plan.path == str(good)
    assert steps(tmp_path) == [10] and (tmp_path / "unreadable" / bad.name).is_file()
    with pytest.raises(ValueError, match="cannot be read"):
        plan_resume(tmp_path / "other", str(tmp_path / "unreadable" / bad.name))
    # every checkpoint broken: stop rather than silently start the run afresh
    good.write_bytes(b"")
    with pytest.raises(RuntimeError, match="every checkpoint"):
        plan_resume(tmp_path)


def test_a_dry_run_decides_the_same_and_moves_nothing(tmp_path: Path) -> None:
    start = save(tmp_path, 10, [])
    save(tmp_path, 20, [])  # a roll-back to step 10 moves this aside, but not in a dry run
    before = sorted(os.listdir(tmp_path))
    dry = plan_resume(tmp_path, str(start), dry_run=True)
    assert sorted(os.listdir(tmp_path)) == before and dry.moved_aside == []
    real = plan_resume(tmp_path, str(start))
    assert dry.path == real.path == str(start) and dry.lineage == real.lineage
    assert [Path(p).name for p in real.moved_aside] == [checkpoint_name(20)]


def test_the_run_lock_refuses_a_second_live_job_and_takes_over_a_dead_ones(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    folder = tmp_path / "checkpoints"
    first = RunLock(folder)
    first.acquire()
    owner = json.loads((folder / ".lock").read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match=r"in use by job None \(pid \d+ on"):
        RunLock(folder).acquire()
    first.release()
    assert not folder.exists()  # released, and the empty folder with it
    folder.mkdir()
    # a lock left by a process that died (SIGKILL, node reboot) on this host is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".lock").write_text(json.dumps({"host": owner["host"], "pid": int(dead.stdout), "job_id": None}))
    second = RunLock(folder)
    second.acquire()
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    second.release()
    # a requeued attempt of the same SLURM job takes over its earlier attempt's lock
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "job_id": "4242"}))
    RunLock(folder).acquire()


def test_a_larger_max_steps_moves_the_end_of_the_schedule(tmp_path: Path) -> None:
    """decay_until follows ${trainer.max_steps}: the resumed run decays to the new end, and its first step already
    uses the new schedule's LR (not the finished run's 0)."""
    def scheduler(decay_until: int):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, warmup_scheduler(optimizer, warmup_steps=2, decay_until=decay_until)

    optimizer, old = scheduler(10)
    for _ in range(10):
        optimizer.step()
        old.step()
    assert optimizer.param_groups[0]["lr"] == 0.0  # the finished run ended annealed
    state, opt_state = old.state_dict(), optimizer.state_dict()

    optimizer, new = scheduler(20)
    optimizer.load_state_dict(opt_state)  # Lightning restores the optimizer, then the scheduler
    new.load_state_dict(state)
    assert new.lr_lambdas[0].decay_until == 20
    assert optimizer.param_groups[0]["lr"] == pytest.approx((20 - 10) / (20 - 2))
    new.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx((20 - 11) / (20 - 2))

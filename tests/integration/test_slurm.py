"""A real one-node Slurm cluster on localhost (Debian's slurmctld, slurmd and munge): the project's own sbatch template
trains a tiny Stage A with two loader workers and is preempted with SIGUSR1, which Slurm delivers to every process
of the job step (the training process, its loader workers) at an awkward moment: in the first epoch, during
validation, during a checkpoint save, before the first step, and in a ``ckpt_path=`` run. Each job requeues itself,
resumes and finishes COMPLETED with exit code 0 and every step logged exactly once in one run directory.

Needs root and the Debian packages ``slurmctld slurmd munge`` (``.ci/run`` installs them); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import ROOT, SIZE, losses_by_step

from wuerstchen.training.checkpointing import complete_checkpoints

pytestmark = pytest.mark.slurm

SLURM_CONF = """\
ClusterName=wuerstchen-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                      capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """slurmctld + slurmd on this machine; yields the environment the Slurm client commands need."""
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and Debian's slurmctld slurmd munge (missing: {missing or 'root'})")
    if not munge_works():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        wait_for(munge_works, 20, "munged")
    state = tmp_path_factory.mktemp("slurm")
    (state / "spool").mkdir()
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], state=state, cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([daemon, "-D", *flags, "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(state / f"{daemon}.stderr", "w"))
               for daemon, flags in (("slurmctld", ["-c", "-i"]), ("slurmd", []))]
    try:
        def node_ready() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            return out.strip() in ("idle", "mixed", "allocated")
        wait_for(node_ready, 60, "the Slurm node to become idle")
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()


def job_field(env: dict[str, str], job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


@dataclass
class Job:
    name: str
    steps: int
    overrides: list[str]
    signal_at: str = ""             # a tests/signal_at.py moment, or "" for `scancel --signal=USR1` from the test
    signal_after: int = 0           # outside signal: once a checkpoint at this step exists
    first_step: int = 0             # steps before this one were trained before the job (ckpt_path=...)
    id: str = ""
    signalled: bool = False
    released: bool = False
    expect: dict = field(default_factory=dict)


def submit(env: dict[str, str], tmp_path: Path, job: Job, shards: Path) -> None:
    # the template's WUERSTCHEN_PYTHON: scripts/train.py under tests/signal_at.py, which asks Slurm for SIGUSR1 to
    # the whole job step at the job's moment (SIGNAL_AT), in its first attempt only
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'signal_at.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    overrides = ["experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "stage.latent_scale_images=32", f"data.image_size={SIZE}",
                 f"data.urls={shards / 'train'}", f"data.val_urls={shards / 'val'}", "data.val_batches=2",
                 "data.num_workers=2", f"trainer.max_steps={job.steps}", "trainer.log_every_n_steps=1",
                 "callbacks.checkpoint.every_n_steps=4", "callbacks.checkpoint.keep_last=null",
                 "callbacks.preview=null", "callbacks.progress.refresh_rate=0", *job.overrides]
    # CPU-only cluster: the template's GPU, task and CPU requests are overridden on the command line
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={job.name}", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--gpus-per-node=0", "--mem=0", "--time=30", str(ROOT / "slurm" / "train.sbatch"), *overrides],
        env={**env, "WUERSTCHEN_PYTHON": str(wrapper), "SIGNAL_AT": job.signal_at, "SIGNAL_HOW": "scancel",
             "SIGNAL_SAVE_STEP": "8"}, cwd=tmp_path,
        capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job.id = submitted.stdout.strip().split(";")[0]


def drive(env: dict[str, str], jobs: list[Job], runs: Path, tmp_path: Path, timeout: float = 900) -> None:
    """Signal, release after the requeue, and wait until every job has ended."""
    deadline = time.monotonic() + timeout
    pending = list(jobs)
    while pending:
        assert time.monotonic() < deadline, {j.name: job_field(env, j.id, "JobState") for j in pending}
        for job in list(pending):
            state = job_field(env, job.id, "JobState")
            checkpoints = runs / f"{job.name}-{job.id}" / "checkpoints"
            if not job.signal_at and not job.signalled and state == "RUNNING" and any(
                    step >= job.signal_after for step, _ in complete_checkpoints(checkpoints)):
                # what `--signal=USR1@N` does near the time limit: SIGUSR1 to every process of the job's steps
                subprocess.run(["scancel", "--signal=USR1", job.id], env=env, check=True)
                job.signalled = True
            if state == "PENDING" and job_field(env, job.id, "Restarts") not in ("", "0") and not job.released:
                # slurmd refuses a relaunch whose credential is from the same second as the requeue's revocation
                # ("Job credential revoked"); Slurm's own requeue delay avoids that, skipping it must too
                time.sleep(2)
                subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], env=env, check=True)
                job.released = True
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                pending.remove(job)
        time.sleep(0.5)


def test_sbatch_template_requeues_on_preemption_at_awkward_moments(slurm: dict[str, str], shards: Path,
                                                                   chain: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    env = {**slurm, "WUERSTCHEN_REPO": str(ROOT), "WUERSTCHEN_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    tiny = ["data.batch_size=4", "data.batches_per_epoch=6"]
    start = chain["a"] / "checkpoints" / "last.ckpt"  # step 60 of the session's tiny Stage A (conftest.chain)
    from_ckpt = ["data.batch_size=8", "stage.disc_start=40", "data.batches_per_epoch=20", f"ckpt_path={start}"]
    jobs = [
        Job("first-epoch", 80, ["data.batch_size=4", "data.batches_per_epoch=50"], signal_after=12),
        Job("validation", 30, tiny, signal_at="validation"),
        Job("save", 30, tiny, signal_at="save"),
        Job("setup", 20, tiny, signal_at="setup"),
        Job("ckpt-path", 100, from_ckpt, signal_after=68, first_step=60),
    ]
    for job in jobs:
        submit(env, tmp_path, job, shards)
    try:
        drive(env, jobs, runs, tmp_path)
    finally:
        for job in jobs:
            subprocess.run(["scancel", job.id], env=env)
    for job in jobs:
        run_dir = runs / f"{job.name}-{job.id}"
        log = (tmp_path / f"{job.name}-{job.id}.out").read_text()
        checkpoints = run_dir / "checkpoints"
        assert job_field(env, job.id, "JobState") == "COMPLETED", (job.name, log[-4000:])
        assert job_field(env, job.id, "ExitCode") == "0:0", (job.name, log[-4000:])
        assert job_field(env, job.id, "Restarts") == "1", job.name
        assert "attempt 1" in log and "attempt 2" in log and "requeued SLURM job" in log, job.name
        assert "Traceback" not in log and "killed by signal" not in log, (job.name, log[-4000:])
        # one run directory, every step trained and logged exactly once across both attempts
        assert sorted(losses_by_step(run_dir)) == list(range(job.first_step, job.steps)), job.name
        assert complete_checkpoints(checkpoints)[-1][0] == job.steps
        if job.name == "setup":  # stopped before its first step: nothing to save, the second attempt starts afresh
            assert "before the first step: stopping, nothing to save" in log and "resuming from" not in log
            continue
        stopped = int(re.search(r"received SIGUSR1: saving at step (\d+)", log).group(1))
        resumed = f"resuming from {checkpoints / f'step={stopped:07d}.ckpt'}"
        assert resumed in log, (job.name, log[-4000:])
        if job.name == "ckpt-path":  # the first attempt started from ckpt_path, the requeued one from its own newest
            assert f"resuming from {start} (ckpt_path=" in log
            assert "(the newest checkpoint descending from ckpt_path=" in log.split(resumed)[1][:200]
            assert 68 <= stopped < job.steps
        elif job.name == "first-epoch":
            assert 12 <= stopped < 50
        else:  # validation after step 6 and the save of step 8 both stop at the following step
            assert stopped == {"validation": 7, "save": 9}[job.name], (job.name, log[-3000:])


def test_a_failed_requeue_says_so(slurm: dict[str, str], monkeypatch) -> None:
    from wuerstchen.training.preemption import requeue_slurm_job

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_ID", "999999")  # no such job: the real scontrol refuses
    assert requeue_slurm_job() is False

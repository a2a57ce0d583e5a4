"""A real one-node Slurm cluster on localhost (Debian's slurmctld, slurmd and munge): the project's own sbatch template
trains a tiny Stage A, is preempted with SIGUSR1, requeues itself, resumes from its checkpoint and finishes with
every step logged exactly once in one run directory.

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


def test_sbatch_template_requeues_on_preemption_and_resumes(slurm: dict[str, str], shards: Path,
                                                           tmp_path: Path) -> None:
    steps = 200
    runs = tmp_path / "runs"
    env = {**slurm, "WUERSTCHEN_PYTHON": sys.executable, "WUERSTCHEN_REPO": str(ROOT),
           "WUERSTCHEN_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    # CPU-only cluster: the template's GPU, task and CPU requests are overridden on the command line
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--job-name=shapes", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
         "--mem=0", "--time=30", str(ROOT / "slurm" / "train.sbatch"),
         "experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "data.batch_size=4", f"data.image_size={SIZE}",
         f"data.urls={shards / 'train'}", "data.val_urls=null", "data.num_workers=0", "data.batches_per_epoch=50",
         f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=10",
         "callbacks.checkpoint.keep_last=null", "callbacks.preview=null", "callbacks.progress.refresh_rate=0"],
        env=env, cwd=tmp_path, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    run_dir = runs / f"shapes-{job}"
    checkpoints = run_dir / "checkpoints"
    output = tmp_path / f"shapes-{job}.out"
    try:
        wait_for(lambda: any(step >= 20 for step, _ in complete_checkpoints(checkpoints)), 300,
                 f"job {job} to reach step 20 ({output.read_text()[-3000:] if output.exists() else 'no output'})")
        # what `--signal=USR1@N` does near the time limit: SIGUSR1 to every task of the job's steps
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
        wait_for(lambda: job_field(env, job, "Restarts") not in ("", "0") and
                 job_field(env, job, "JobState") == "PENDING", 120, f"job {job} to requeue")
        # slurmd refuses a relaunch whose credential is from the same second as the requeue's revocation
        # ("Job credential revoked"); Slurm's own requeue delay avoids that, skipping it must too
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
        wait_for(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400,
                 f"job {job} to finish")
    finally:
        subprocess.run(["scancel", job], env=env)
    log = output.read_text()
    assert job_field(env, job, "JobState") == "COMPLETED", log[-4000:]
    assert job_field(env, job, "Restarts") == "1"
    assert "attempt 1" in log and "attempt 2" in log
    preempted_at = int(re.search(r"received SIGUSR1: saving at step (\d+)", log).group(1))
    assert 20 <= preempted_at < steps
    assert f"resuming from {checkpoints / f'step={preempted_at:07d}.ckpt'}" in log
    assert "requeued SLURM job" in log
    # one run directory, every step trained and logged exactly once across both attempts
    assert sorted(losses_by_step(run_dir)) == list(range(steps))
    assert len(list((run_dir / "csv").glob("version_*"))) == 2
    assert complete_checkpoints(checkpoints)[-1][0] == steps

"""Which checkpoint a run continues from, and who may write a run directory.

Lineage. The checkpoints a run writes remember the explicit start points (the ``ckpt_path`` values) behind them:
an attempt started with ``ckpt_path=X`` writes ``lineage(X) + [X]``, an attempt that merely continues a checkpoint
keeps that checkpoint's lineage. It is kept in ``checkpoints/lineage.json`` next to the checkpoints (and inside each
checkpoint), so deciding needs no checkpoint to be opened. A checkpoint *descends* from X when X is in its lineage;
X is named by its absolute path as given (``.../last.ckpt`` stays the same name however the link moves). With that:

- no ``ckpt_path``: the run continues from its newest readable checkpoint (re-running a command resumes it);
- ``ckpt_path=X``: X is where the first attempt starts. A requeued attempt, or any re-run, whose run directory holds
  checkpoints descending from X continues from the newest of them instead of training the same steps again;
- ``ckpt_path=X`` with newer checkpoints in the run directory that do not descend from X rolls the run back: those
  are moved aside into ``checkpoints/abandoned-<time>/`` (never deleted), so pruning and the next resume only see
  the live branch.

A checkpoint whose file is truncated or structurally broken (a node crashed while the file system still held part of
it) is reported, moved into ``checkpoints/unreadable/`` and the previous one is used, so a requeued job does not die
on it every time. An I/O error while looking is raised, never taken for a broken checkpoint, and a run whose
checkpoints are all broken stops instead of starting afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
LOCK_FILE = ".lock"


def identity(path: str | os.PathLike) -> str:
    """How a lineage names a start point: its absolute path as given (symlinks such as ``last.ckpt`` kept)."""
    return os.path.abspath(path)


def _names(path: str | os.PathLike) -> set[str]:
    """Every name a lineage may know a file by: as given, and with symlinks resolved."""
    return {os.path.abspath(path), os.path.realpath(path)}


# -------------------------------------------------------------------------------------------------------- lineage
def read_lineages(dirpath: str | os.PathLike) -> dict[str, list[str]]:
    """``{checkpoint file name: lineage}`` of a checkpoint folder ({} when it has no index)."""
    index = Path(dirpath) / LINEAGE_FILE
    try:
        return {str(k): [str(x) for x in v] for k, v in json.loads(index.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def write_lineages(dirpath: str | os.PathLike, lineages: dict[str, list[str]]) -> None:
    """Replace the index atomically (written beside it, fsynced, renamed)."""
    index = Path(dirpath) / LINEAGE_FILE
    tmp = index.with_name(f".{LINEAGE_FILE}.partial")
    with open(tmp, "w") as f:
        json.dump(lineages, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index)


def lineage_of(path: str | os.PathLike, lineages: dict[str, list[str]] | None = None) -> list[str] | None:
    """The lineage recorded for a checkpoint: in the index of its folder, else inside the checkpoint itself; None
    when neither knows (a checkpoint from before lineages were recorded)."""
    real = Path(os.path.realpath(path))
    lineages = read_lineages(real.parent) if lineages is None else lineages
    if real.name in lineages:
        return lineages[real.name]
    if real.is_file():
        from ..weights import checkpoint_info

        found = checkpoint_info(real).get("lineage")
        return [str(x) for x in found] if isinstance(found, list) else None
    return None


# ------------------------------------------------------------------------------------------------------- validity
def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a complete checkpoint cannot be loaded (truncated or empty), or None. Reads only the zip directory or the
    folder listing, not the tensors, so it costs milliseconds for checkpoints of any size."""
    path = Path(path)
    if path.is_dir():  # torch distributed checkpoint: a .metadata file and per-rank shards (not their contents)
        metadata = path / ".metadata"
        if not metadata.is_file() or metadata.stat().st_size == 0:
            return "its .metadata file is missing or empty"
        if not any(path.glob("*.distcp")):
            return "it holds no .distcp shard"
        return None
    size = path.stat().st_size  # an I/O error here is the file system's, not the checkpoint's: raised
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format: the directory sits at the end of the file
            members = archive.infolist()
    except (zipfile.BadZipFile, EOFError) as exn:
        return f"{type(exn).__name__}: {exn}"
    if not any(m.filename.endswith("/data.pkl") or m.filename == "data.pkl" for m in members):
        return "it holds no data.pkl"
    if any(m.header_offset + m.compress_size > size for m in members):
        return "a member ends past the end of the file"
    return None


# --------------------------------------------------------------------------------------------------------- choice
@dataclass
class ResumePlan:
    """Where a run starts, what lineage its checkpoints get, and what was moved aside to get there."""

    path: str | None
    lineage: list[str] = field(default_factory=list)
    moved_aside: list[str] = field(default_factory=list)
    reason: str = "a fresh run"


def _complete(dirpath: Path) -> list[tuple[int, Path]]:
    from .checkpointing import complete_checkpoints  # the folder's layout is checkpointing's

    return complete_checkpoints(dirpath)


def _move_aside(paths: list[Path], into: Path) -> list[str]:
    into.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in paths:
        target = into / path.name
        os.replace(path, target)
        moved.append(str(target))
    return moved


def _newest_readable(candidates: list[tuple[int, Path]], dirpath: Path, dry_run: bool) -> tuple[Path | None, list[str]]:
    """The newest candidate that can be read; broken newer ones are moved into ``unreadable/``. Raises when there were
    candidates and every one is broken: starting afresh would silently drop the run."""
    moved: list[str] = []
    for _, path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, moved
        log.error("checkpoint %s cannot be read (%s): resuming from the one before it; it is kept in %s", path,
                  problem, dirpath / "unreadable")
        if not dry_run:
            moved += _move_aside([path], dirpath / "unreadable")
    if candidates:
        raise RuntimeError(f"every checkpoint in {dirpath} is broken (moved into {dirpath / 'unreadable'}): inspect "
                           f"them, or choose ckpt_path= or a new run_dir")
    return None, moved


def _relink_last(dirpath: Path) -> None:
    """Point ``last.ckpt`` at the newest checkpoint left after moving some aside (or remove it if none is left)."""
    link = dirpath / "last.ckpt"
    if not link.is_symlink() or link.exists():
        return
    link.unlink()
    if complete := _complete(dirpath):
        os.symlink(complete[-1][1].name, link)


def plan_resume(dirpath: str | os.PathLike, ckpt_path: str | None = None, dry_run: bool = False) -> ResumePlan:
    """Decide where a run with checkpoint folder ``dirpath`` (and the user's ``ckpt_path``, if any) starts.

    ``dry_run``: decide without moving anything (what every rank but the first computes to check agreement).
    """
    dirpath = Path(dirpath)
    plan = _plan(dirpath, ckpt_path, dry_run)
    if plan.moved_aside and not dry_run:
        _relink_last(dirpath)
    return plan


def _plan(dirpath: Path, ckpt_path: str | None, dry_run: bool) -> ResumePlan:
    complete = _complete(dirpath)
    lineages = read_lineages(dirpath)
    if ckpt_path is None:
        path, moved = _newest_readable(complete, dirpath, dry_run)
        if path is None:
            return ResumePlan(None, moved_aside=moved)
        return ResumePlan(str(path), lineage_of(path, lineages) or [], moved, "the run's newest")
    root = identity(ckpt_path)
    known = {p: lineage_of(p, lineages) for _, p in complete}
    descendants = [(step, p) for step, p in complete if root in (known[p] or [])]
    if descendants:  # found before ckpt_path must exist: a requeued run's start may have been pruned since
        path, moved = _newest_readable(descendants, dirpath, dry_run)
        return ResumePlan(str(path), known[path], moved, f"the newest checkpoint descending from ckpt_path={ckpt_path}")
    start = Path(ckpt_path)
    if not start.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    if (problem := checkpoint_problem(start)) is not None:
        raise ValueError(f"ckpt_path={ckpt_path} cannot be read: {problem}")
    start_step = _step_of(start)
    later = [p for step, p in complete if step > start_step and not (_names(p) & _names(start))]
    unknown = [p.name for p in later if known[p] is None]
    if unknown:
        raise RuntimeError(
            f"ckpt_path={ckpt_path}: {dirpath} holds later checkpoints with no lineage record ({', '.join(unknown)}), "
            f"so it cannot tell whether they continue it. Drop ckpt_path= to resume from the newest, or move them "
            f"away to roll back.")
    moved: list[str] = []
    if later and not dry_run:
        into = dirpath / time.strftime("abandoned-%Y%m%dT%H%M%S", time.gmtime())
        moved = _move_aside(later, into)
        log.warning("ckpt_path=%s rolls the run back to step %d: %d later checkpoints of the abandoned branch moved "
                    "to %s", ckpt_path, start_step, len(later), into)
    return ResumePlan(str(start), (lineage_of(start) or []) + [root], moved, f"ckpt_path={ckpt_path}")


def _step_of(path: Path) -> int:
    from .checkpointing import STEP_PATTERN

    if (match := STEP_PATTERN.match(Path(os.path.realpath(path)).name)) is not None:
        return int(match.group(1))
    from ..weights import checkpoint_info

    return int(checkpoint_info(path).get("global_step", 0))


# ----------------------------------------------------------------------------------------------------------- lock
def slurm_job_id() -> str | None:
    """This SLURM job's id as ``scontrol`` takes it (``ARRAYJOB_TASK`` for array tasks), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def _slurm_job_alive(job: str) -> bool | None:
    """Whether SLURM still runs ``job`` (None: cannot tell, e.g. no ``scontrol`` or no answer from the controller)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return False if "Invalid job id" in out.stderr else None  # long gone, or the controller did not answer
    return any(f"JobState={state}" in out.stdout for state in ("RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``checkpoints/.lock``: one job at a time writes a run directory.

    The file holds the owner's host, pid and SLURM job id; it appears atomically (written under a private name, then
    hard-linked into place, which fails if it exists, also on NFS). A lock is stale when it belongs to this same SLURM
    job (a requeued attempt: SLURM never runs two attempts of a job at once), to a dead process on this host, or to a
    SLURM job that no longer exists; a stale lock is renamed away (only one contender can) and taken. Otherwise
    :meth:`acquire` raises, naming the owner.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.path = Path(dirpath) / LOCK_FILE
        self.held = False
        self._mine = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": slurm_job_id()}

    def _stale(self, owner: dict[str, Any]) -> bool:
        job = owner.get("job_id")
        if job is not None and job == slurm_job_id():
            return True
        if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
            return True
        return job is not None and _slurm_job_alive(str(job)) is False

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}")
        mine.write_text(json.dumps({**self._mine, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        try:
            for _ in range(5):
                try:
                    os.link(mine, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                if owner and not self._stale(owner):
                    raise RuntimeError(
                        f"run directory {self.path.parent.parent} is in use by job {owner.get('job_id')} (pid "
                        f"{owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}): two jobs must not "
                        f"write one run_dir. Choose another run_dir, or delete {self.path} if that job is gone.")
                log.warning("taking over the stale lock %s (%s)", self.path, owner or "unreadable")
                with contextlib.suppress(FileNotFoundError):  # another contender renamed it first: try again
                    os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}"))
            raise RuntimeError(f"could not take the lock {self.path}: other processes keep taking it")
        finally:
            mine.unlink(missing_ok=True)
            for stale in self.path.parent.glob(f"{LOCK_FILE}.stale.*"):
                stale.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner and {k: owner.get(k) for k in self._mine} == self._mine:  # never another job's lock
            self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a run that stopped before it saved anything leaves no empty folder
            self.path.parent.rmdir()


# ------------------------------------------------------------------------------------------------- rank agreement
PLAN_ENV = "WUERSTCHEN_RESUME_PLAN"
PLAN_FILE = ".resume_plan.json"


def _attempt_key() -> str | None:
    """A name every rank of this launch shares and no other launch has: the SLURM job, its restart count and the
    job step (several ``srun`` in one allocation)."""
    job = slurm_job_id()
    if job is None:
        return None
    return f"{job}/{os.environ.get('SLURM_RESTART_COUNT', '0')}/{os.environ.get('SLURM_STEP_ID', '')}"


def is_rank_zero_from_env() -> bool:
    """Whether this process is global rank 0 of its launch, from the launcher's environment (before any process
    group): ``RANK`` (torchrun), else ``SLURM_PROCID`` for a multi-task srun step, else Lightning's own launcher's
    ``NODE_RANK`` and ``LOCAL_RANK`` (its children have them; the process that launches them is rank 0)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]) == 0
    return int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def agree_on_plan(dirpath: str | os.PathLike, ckpt_path: str | None, lock: RunLock, rank_zero: bool | None = None,
                  timeout: float = 600.0) -> ResumePlan:
    """The resume plan of this launch, decided by rank 0 alone and followed by the others.

    Rank 0 takes the run directory's lock, decides (moving abandoned or unreadable checkpoints aside) and publishes
    its plan: in the environment, for the ranks Lightning launches from this process, and in
    ``checkpoints/.resume_plan.json`` under the SLURM attempt's name, for ranks that ``srun`` started beside it,
    which wait for it. Ranks of other launchers decide the same rule without moving anything; the Checkpointing
    callback compares every rank's plan with rank 0's once the process group is up.
    """
    dirpath = Path(dirpath)
    if os.environ.get(PLAN_ENV):
        return ResumePlan(**json.loads(os.environ[PLAN_ENV]))
    key = _attempt_key()
    if rank_zero is None:
        rank_zero = is_rank_zero_from_env()
    if rank_zero:
        lock.acquire()
        plan = plan_resume(dirpath, ckpt_path)
        encoded = json.dumps(plan.__dict__)
        os.environ[PLAN_ENV] = encoded
        if key is not None:
            tmp = dirpath / f".{PLAN_FILE}.partial"
            tmp.write_text(json.dumps({"attempt": key, "plan": plan.__dict__}))
            os.replace(tmp, dirpath / PLAN_FILE)
        return plan
    if key is None:
        return plan_resume(dirpath, ckpt_path, dry_run=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            published = json.loads((dirpath / PLAN_FILE).read_text())
        except (OSError, ValueError):
            published = {}
        if published.get("attempt") == key:
            return ResumePlan(**published["plan"])
        time.sleep(0.5)
    raise TimeoutError(f"rank 0 published no resume plan for attempt {key} in {dirpath / PLAN_FILE} within "
                       f"{timeout:.0f} s")

"""Samples that kill a loader worker outside Python (a decoder's segfault, the OOM killer) are not read again.

Every per-sample Python exception is caught and counted in the stream itself; a worker that dies of a signal takes
the run with it instead, and an exact resume would read the same sample again and die again. So when the training
process sees a worker die, it records the sample the dead worker was reading (the stream's
:class:`InFlight` notes) in ``<run_dir>/data_crash.json``; the next run of the same
command (a resubmission: SLURM does not requeue a failed job) skips it (``bad_sample``) and still resumes exactly.
When the worker died between samples (while reading the shard itself), or the same crash comes back with nothing new
to skip, the next run draws a fresh stream instead (``restart_index + 1``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CRASH_FILE = "data_crash.json"
_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:exited unexpectedly|is killed by signal)")


def dead_worker_pids(exception: BaseException) -> set[int] | None:
    """The pids of the loader workers an exception reports dead, or None when it reports no such death."""
    match = _DIED.search(str(exception)) if isinstance(exception, RuntimeError) else None
    if match is None:
        return None
    return {int(pid) for pid in re.findall(r"\d+", match.group(1))}


class InFlight:
    """The sample each loader worker is reading right now, kept in memory shared with the training process, so that
    when a worker dies outside Python (a decoder's segfault, the OOM killer) the training process can name the sample
    it died on (:meth:`suspects`). One fixed slot of ``SLOT_BYTES`` per worker; a note is one memory copy."""

    SLOTS, SLOT_BYTES = 64, 1024

    def __init__(self) -> None:
        self._buffer = multiprocessing.RawArray(ctypes.c_char, self.SLOTS * self.SLOT_BYTES)  # inherited by workers

    def note(self, slot: int, where: str) -> None:
        data = f"{os.getpid()}\t{where}".encode("utf-8", "replace")[: self.SLOT_BYTES - 1] + b"\0"
        start = (slot % self.SLOTS) * self.SLOT_BYTES
        self._buffer[start:start + len(data)] = data

    def clear(self, slot: int) -> None:
        self._buffer[(slot % self.SLOTS) * self.SLOT_BYTES] = b"\0"

    def suspects(self, pids: set[int]) -> list[str]:
        """The samples the workers with these pids were reading ([] when they were between samples, or when the dead
        worker was not one of this stream's)."""
        notes = []
        for slot in range(self.SLOTS):
            raw = bytes(self._buffer[slot * self.SLOT_BYTES:(slot + 1) * self.SLOT_BYTES]).split(b"\0", 1)[0]
            if b"\t" in raw:
                pid, where = raw.decode("utf-8", "replace").split("\t", 1)
                notes.append((int(pid), where))
        return [where for pid, where in notes if pid in pids]


@dataclass
class LoaderCrashes:
    """The record of loader-worker deaths of one run directory: the samples to skip, and the restart index the next
    attempt must use at least."""

    skip_keys: set[str] = field(default_factory=set)
    restart_index: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> "LoaderCrashes | None":
        path = Path(run_dir) / CRASH_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exn:
            log.warning("ignoring unreadable %s: %s", path, exn)
            return None
        return cls(set(record.get("skip_keys", [])), int(record.get("restart_index", 0)),
                   list(record.get("errors", [])))

    def add(self, suspects: list[str], restart_index: int, error: str) -> None:
        """Record a death while the stream ran with ``restart_index``, reading ``suspects``."""
        new = set(suspects) - self.skip_keys
        self.skip_keys |= new
        # nothing new to skip: skipping did not help, so the next attempt reads another stream
        self.restart_index = max(self.restart_index, restart_index + (0 if new else 1))
        self.errors.append(error[:500])

    def write(self, run_dir: str | os.PathLike) -> Path:
        path = Path(run_dir) / CRASH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CRASH_FILE}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({"skip_keys": sorted(self.skip_keys), "restart_index": self.restart_index,
                                   "errors": self.errors[-20:]}, indent=1))
        os.replace(tmp, path)
        return path

"""Shard specs (brace patterns, lists, directories of ``.tar`` files, ``pipe:`` commands, remote URLs), and reading
one shard: opened with a read timeout, its tar errors classified and counted, given up when the counter says so."""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import random
import selectors
import signal
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

if TYPE_CHECKING:
    from .pipeline import RejectCounter

log = logging.getLogger(__name__)

ShardSpec = str | Sequence[str]

# Anything with one of these prefixes is opened by webdataset's gopen and cannot be checked for existence up front.
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")


class ShardSpecError(ValueError):
    """A shard spec that names no readable shard."""


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def _expand_one(pattern: str) -> list[str]:
    """Expand one spec entry into shard URLs; local entries are checked to exist."""
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if _is_remote(item):
            urls.append(item)
        elif item.startswith("file:"):
            urls.extend(_expand_one(item[len("file:") :]))
        elif os.path.isdir(item):
            urls.extend(sorted(glob.glob(os.path.join(glob.escape(item), "*.tar"))))
        elif glob.has_magic(item):
            urls.extend(sorted(p for p in glob.glob(item) if p.endswith(".tar")))
        elif os.path.isfile(item):
            urls.append(item)
    return urls


def expand_shard_spec(spec: ShardSpec) -> list[str]:
    """Resolve a shard spec to a list of shard URLs.

    ``spec`` is a string or a list of strings; each string may be a brace pattern (``shards/{00000..00099}.tar``),
    a glob, a directory (all ``*.tar`` files in it), a local file, or a ``pipe:``/remote URL. A string may also hold
    several entries separated by ``::`` (webdataset's convention). Local shards that a pattern names but that do not
    exist are dropped with a warning (img2dataset leaves gaps when a shard fails); a spec that resolves to nothing
    raises :class:`ShardSpecError` naming the spec.
    """
    entries = spec.split("::") if isinstance(spec, str) else [str(s) for s in spec]
    entries = [e.strip() for e in entries if e and e.strip()]
    if not entries:
        raise ShardSpecError(f"empty shard spec {spec!r}")
    urls: list[str] = []
    num_named_local = 0
    for entry in entries:
        found = _expand_one(entry)
        if not _is_remote(entry) and not glob.has_magic(entry) and not os.path.isdir(entry):
            num_named_local += len(list(braceexpand.braceexpand(entry)))
        urls.extend(found)
    if not urls:
        raise ShardSpecError(
            f"shard spec {spec!r} matches no .tar file (checked brace patterns, globs, directories and files; "
            f"working directory {os.getcwd()})"
        )
    num_local = sum(not _is_remote(u) for u in urls)
    if num_named_local > num_local:
        log.warning("shard spec %r: %d of %d named shards do not exist", spec, num_named_local - num_local,
                    num_named_local)
    return urls


def split_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one (rank, worker) reads in the finite, non-resampled mode.

    Shard ``i`` goes to global worker ``i % (world_size * num_workers)``. When there are fewer shards than global
    workers, every worker still gets one (``urls[slot % len(urls)]``) so no rank runs dry; that duplicates samples,
    which is the lesser evil for validation.
    """
    num_slots = world_size * num_workers
    slot = rank * num_workers + worker
    if len(urls) >= num_slots:
        return list(urls[slot::num_slots])
    return [urls[slot % len(urls)]]


def resampled_shards(urls: Sequence[str], rng: random.Random):
    """Infinite stream of shards drawn with replacement, the order fixed by ``rng``."""
    while True:
        yield urls[rng.randrange(len(urls))]


class StalledShardError(TimeoutError):
    """A shard's stream sent nothing for ``read_timeout`` seconds."""


class PipeStream(io.RawIOBase):
    """The stdout of a ``pipe:`` command, where a read that waits longer than ``read_timeout`` seconds fails.

    webdataset's own pipe blocks forever when a remote copy stalls, which hangs every rank at the next collective.
    The command runs in its own session, so a signal to the training job's process group (Slurm's SIGUSR1 or SIGTERM
    before the time limit) does not kill a download under way; the stream kills the command's process group itself
    on a stall and on close.
    """

    def __init__(self, url: str, read_timeout: float) -> None:
        super().__init__()
        self.url, self.read_timeout = url, float(read_timeout)
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self._stalled: StalledShardError | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if self._stalled is not None:  # tarfile reads on after a failed member; fail at once, not one timeout more
            raise self._stalled
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:  # epoll: any fd number (select() stops at 1024)
            selector.register(fd, selectors.EVENT_READ)
            ready = selector.select(self.read_timeout)
        if not ready:
            self._stalled = StalledShardError(f"{self.url}: no data for {self.read_timeout:g} s (data.read_timeout); "
                                              f"the command was stopped")
            self._kill()
            raise self._stalled
        count = os.readv(fd, [buffer])
        if count == 0:
            self._check_exit()
        return count

    def _check_exit(self) -> None:
        """At the end of the output: a command that failed (``cat`` of a missing file) makes the shard unreadable."""
        try:
            status = self.proc.wait(timeout=self.read_timeout)
        except subprocess.TimeoutExpired:  # closed its output but runs on: what it sent is all there is
            self._kill()
            return
        if status not in (0, 141, -signal.SIGPIPE):  # 141: a shell whose command got SIGPIPE
            raise OSError(f"{self.url}: the command exited with status {status}")

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            self._kill()  # done reading (end of the tar, or the shard was given up): the rest is not needed
        super().close()


def open_shard(url: str, read_timeout: float = 120.0) -> BinaryIO:
    """A readable binary stream of one shard: ``pipe:`` commands as :class:`PipeStream`, the rest by webdataset's
    ``gopen`` (local files, ``http(s)://`` through curl, ``gs://``, ...)."""
    if url.startswith("pipe:"):
        return io.BufferedReader(PipeStream(url, read_timeout), buffer_size=1 << 16)
    return gopen(url)


def _classify_tar_error(exn: BaseException) -> str:
    message = str(exn)
    if isinstance(exn, StalledShardError):
        return "stalled_shard"
    if isinstance(exn, FileNotFoundError | PermissionError | IsADirectoryError) or "empty file" in message:
        return "unreadable_shard"
    if isinstance(exn, tarfile.ReadError | EOFError) or "unexpected end" in message:
        return "truncated_tar"
    if isinstance(exn, OSError):
        return "unreadable_shard"
    return "tar_error"


class ShardReader:
    """Reads one shard's samples with webdataset's tar iterators; counts at most one error per shard, and stops
    reading a shard the counter gave up on."""

    def __init__(self, counter: RejectCounter, read_timeout: float = 120.0) -> None:
        self.counter = counter
        self.read_timeout = read_timeout
        self._url = ""
        self._failed = False

    def _on_error(self, exn: BaseException) -> bool:
        if not self._failed:
            self._failed = True
            first = exn.args[0] if exn.args else ""  # webdataset appends the stream and url to args
            self.counter.reject(_classify_tar_error(exn), f"{self._url}: {type(exn).__name__}: {first}")
        return True  # keep going: the rest of the stream is still good

    def __call__(self, url: str) -> Iterator[dict[str, Any]]:
        self._url, self._failed = url, False
        self.counter.start_shard(url)
        try:
            stream = open_shard(url, self.read_timeout)
        except Exception as exn:
            self._on_error(exn)
            return
        num_samples = 0
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=self._on_error)
            for sample in group_by_keys(files, handler=self._on_error):
                num_samples += 1
                yield sample
                if self.counter.gave_up(url):
                    return
        finally:
            with contextlib.suppress(Exception):  # a closing pipe's exit status says nothing the reads did not
                stream.close()
        if num_samples == 0 and not self._failed:
            self.counter.reject("empty_shard", url)

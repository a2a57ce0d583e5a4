"""Shard specs: brace patterns, lists, directories of ``.tar`` files, ``pipe:`` commands and remote URLs."""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Sequence

import braceexpand

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

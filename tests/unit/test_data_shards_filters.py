"""Shard specs and the LAION filter."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from wuerstchen.data import LaionFilter, ShardSpecError, expand_shard_spec, split_shards


# -- shard specs --------------------------------------------------------------------------------------------------
def test_brace_pattern_list_directory_glob_and_pipe(good_shards: list[Path]) -> None:
    root = good_shards[0].parent
    expected = [str(p) for p in good_shards]
    assert expand_shard_spec(f"{root}/{{00000..00003}}.tar") == expected
    assert expand_shard_spec(str(root)) == expected
    assert expand_shard_spec(f"{root}/*.tar") == expected
    assert expand_shard_spec([str(p) for p in good_shards[:2]]) == expected[:2]
    assert expand_shard_spec(f"{good_shards[0]}::{good_shards[3]}") == [expected[0], expected[3]]
    assert expand_shard_spec(f"file:{good_shards[1]}") == [expected[1]]
    # pipe: and remote URLs cannot be checked up front and pass through, brace-expanded
    assert expand_shard_spec("pipe:cat /x/{0..2}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar",
                                                          "pipe:cat /x/2.tar"]


def test_spec_with_gaps_warns_and_keeps_the_existing_shards(good_shards: list[Path], caplog) -> None:
    root = good_shards[0].parent
    with caplog.at_level(logging.WARNING):
        urls = expand_shard_spec(f"{root}/{{00000..00009}}.tar")
    assert urls == [str(p) for p in good_shards]
    assert "6 of 10 named shards do not exist" in caplog.text


@pytest.mark.parametrize("spec", ["/nonexistent/{00000..00009}.tar", "/nonexistent/*.tar", "", [], "/tmp"])
def test_spec_matching_nothing_names_the_spec(spec, tmp_path: Path) -> None:
    if spec == "/tmp":
        spec = str(tmp_path)  # an existing directory without .tar files
    with pytest.raises(ShardSpecError) as excinfo:
        expand_shard_spec(spec)
    assert repr(spec) in str(excinfo.value)


def test_split_shards_partitions_over_ranks_and_workers() -> None:
    urls = [f"s{i}" for i in range(10)]
    parts = [split_shards(urls, rank, 2, worker, 3) for rank in range(2) for worker in range(3)]
    assert sorted(u for part in parts for u in part) == urls
    assert all(len(part) >= 1 for part in parts)
    # fewer shards than global workers: every worker still reads one shard
    assert [split_shards(urls[:2], r, 2, w, 2) for r in range(2) for w in range(2)] == [["s0"], ["s1"], ["s0"],
                                                                                       ["s1"]]


# -- LAION filter -------------------------------------------------------------------------------------------------
GOOD = {"original_width": 1024, "original_height": 768, "aesthetic": 6.0, "punsafe": 0.1, "pwatermark": 0.1}


@pytest.mark.parametrize(("change", "reason"), [
    ({}, None),
    # bounds are inclusive
    ({"original_width": 512, "original_height": 512}, None),
    ({"original_width": 4096, "original_height": 4096}, None),
    ({"aesthetic": 5.0}, None),
    ({"punsafe": 0.99}, None),
    ({"pwatermark": 0.5}, None),
    # just outside
    ({"original_height": 511}, "too_small"),
    ({"original_width": 4097}, "too_large"),
    ({"aesthetic": 4.999}, "low_aesthetic"),
    ({"punsafe": 0.9901}, "unsafe"),
    ({"pwatermark": 0.5001}, "watermark"),
    # missing, null, junk and non-finite scores reject, as in the official filter
    ({"pwatermark": None}, "missing_pwatermark"),
    ({"punsafe": "n/a"}, "missing_punsafe"),
    ({"aesthetic": float("nan")}, "missing_aesthetic"),
    # a real 0.0 is a score, not a missing one (the official `x or 1.0` rejected it)
    ({"pwatermark": 0.0, "punsafe": 0.0}, None),
    # numeric strings count
    ({"aesthetic": "5.5"}, None),
])
def test_filter_edges(change: dict, reason: str | None) -> None:
    meta = dict(GOOD, **change)
    assert LaionFilter().reason(meta) == reason
    assert LaionFilter()(meta) is (reason is None)


def test_filter_missing_keys_and_alternatives() -> None:
    f = LaionFilter()
    for key, reason in [("pwatermark", "missing_pwatermark"), ("punsafe", "missing_punsafe"),
                        ("aesthetic", "missing_aesthetic")]:
        assert f.reason({k: v for k, v in GOOD.items() if k != key}) == reason
    # the size falls back to the stored size for shards written without resizing
    no_original = {k: v for k, v in GOOD.items() if not k.startswith("original")}
    assert f.reason(no_original) == "missing_size"
    assert f.reason(dict(no_original, width=600, height=600)) is None
    # AESTHETIC_SCORE is accepted, and either key passing is enough
    without = {k: v for k, v in GOOD.items() if k != "aesthetic"}
    assert f.reason(dict(without, AESTHETIC_SCORE=5.2)) is None
    assert f.reason(dict(GOOD, aesthetic=3.0, AESTHETIC_SCORE=6.0)) is None
    assert f.reason(dict(without, AESTHETIC_SCORE=4.0)) == "low_aesthetic"


def test_filter_thresholds_configurable_and_disable() -> None:
    assert LaionFilter(min_size=256).reason(dict(GOOD, original_height=300)) is None
    assert LaionFilter(min_aesthetic=6.5).reason(GOOD) == "low_aesthetic"
    assert LaionFilter(max_pwatermark=0.05).reason(GOOD) == "watermark"
    off = LaionFilter(min_size=None, max_size=None, min_aesthetic=None, max_punsafe=None, max_pwatermark=None)
    assert not off.enabled
    assert off.reason({}) is None
    only_size = LaionFilter(min_aesthetic=None, max_punsafe=None, max_pwatermark=None)
    assert only_size.reason({"original_width": 600, "original_height": 700}) is None


def test_filter_size_from_laion_columns_or_the_image_header() -> None:
    """img2dataset with --disable_all_reencoding writes no size; LAION's WIDTH/HEIGHT columns, when saved, or the size
    read from the image header stand in, and a json without any size is not a reason to reject."""
    f = LaionFilter()
    scores = {k: v for k, v in GOOD.items() if not k.startswith("original")}
    assert f.json_size(scores) is None
    assert f.reason(scores) == "missing_size"  # no json size and no header given
    assert f.reason(scores, image_size=(800, 600)) is None
    assert f.reason(scores, image_size=(800, 500)) == "too_small"
    assert f.reason(scores, image_size=(4097, 600)) == "too_large"
    # LAION's own columns
    assert f.json_size(dict(scores, WIDTH=640, HEIGHT="480")) == (640.0, 480.0)
    assert f.reason(dict(scores, WIDTH=640, HEIGHT=480), image_size=(800, 600)) == "too_small"  # the json first
    # pairs are taken whole, in trust order: original_*, then the stored size, then LAION's columns
    assert f.json_size(dict(scores, original_width=1000, width=700, height=700, WIDTH=1, HEIGHT=1)) == (700.0, 700.0)
    assert f.json_size(dict(scores, original_width=1000, original_height=900, width=700, height=700)) == (1000, 900)
    assert f.json_size(dict(scores, width=None, height=700, WIDTH=600, HEIGHT=600)) == (600.0, 600.0)
    # the size checks off: no size needed at all
    assert LaionFilter(min_size=None, max_size=None).reason(scores) is None


def test_filter_survives_numbers_beyond_float_range() -> None:
    huge = 10**400  # valid JSON, float() overflows
    assert LaionFilter().reason(dict(GOOD, pwatermark=huge)) == "missing_pwatermark"
    assert LaionFilter().json_size({"original_width": huge, "original_height": 600}) is None

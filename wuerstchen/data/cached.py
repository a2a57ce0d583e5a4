"""Stage C inputs computed once (``scripts/cache_stage_c.py``) and streamed back without decoding an image.

A cache is a folder of WebDataset shards, one per source shard and of the same name, each sample holding
``KEY.latent.npy`` (the compressor's raw latent f, float16, (16, h, w): Stage C's ``to_prior`` is applied at training
time), ``KEY.clip.npy`` (the text encoder's token states, float16, (77, width)), ``KEY.txt`` and the source's
``KEY.json``, plus ``empty_caption.npy`` (the states of "", for caption dropout) and ``cache_info.json`` (what produced
it). Arrays are plain ``.npy`` (read with ``allow_pickle=False``), so any tool can read a cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .pipeline import RejectCounter, WebImageTextDataset
from .shards import ShardSpec

LATENT, CLIP = "latent.npy", "clip.npy"
EMPTY_CAPTION = "empty_caption.npy"
INFO = "cache_info.json"


def encode_npy(array: torch.Tensor | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array.cpu().numpy() if torch.is_tensor(array) else array),
            allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def cache_root(urls: list[str]) -> Path:
    """The folder holding a cache's shards (and its ``empty_caption.npy`` and ``cache_info.json``)."""
    roots = {Path(url).parent for url in urls}
    if len(roots) != 1:
        raise ValueError(f"cached shards must come from one cache folder, got {sorted(map(str, roots))}")
    return roots.pop()


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 over a network's state (names, shapes, dtypes, values): the same compressor, or not."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_cache_matches(info: dict[str, Any], effnet: torch.nn.Module, text_encoder: Any,
                        effnet_scale: float | None) -> None:
    """Refuse to train on a cache made with other frozen networks than the run's, naming the key to fix."""
    if info.get("effnet_sha1") != fingerprint(effnet):
        raise ValueError(f"the cache was written with another compressor ({info.get('stage_b_ckpt')}) than this "
                         f"run's stage_b_ckpt: give the same stage_b_ckpt, or re-cache")
    if info.get("text_encoder") != getattr(text_encoder, "config", None):
        raise ValueError(f"the cache's text encoder {info.get('text_encoder')} is not this run's stage.text_encoder "
                         f"{getattr(text_encoder, 'config', None)}")
    if effnet_scale is not None and info.get("effnet_scale") != effnet_scale:
        raise ValueError(f"the cache's compressor views are {info.get('effnet_scale')} x the image side; set "
                         f"data.effnet_scale={info.get('effnet_scale')}")


def read_cache_info(root: Path) -> dict[str, Any]:
    path = root / INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: data.urls must name shards written by scripts/cache_stage_c.py")
    return json.loads(path.read_text())


class CachedStageCDataset(WebImageTextDataset):
    """Per-shape batches of cached Stage C inputs: ``latents`` (B, 16, h, w) and ``clip`` (B, 77, width) in float16,
    ``captions``, ``keys``, ``meta``, and ``empty_clip`` (1, 77, width) for caption dropout.

    Streaming, shuffling, the rank/worker split, exact resume and reject counting are the image pipeline's; only the
    decoding differs (a sample without both arrays, or with unreadable ones, is skipped and counted).
    """

    def __init__(self, urls: ShardSpec, batch_size: int, **kwargs: Any) -> None:
        kwargs.pop("filter", None)  # the cache holds only samples that passed the filter when it was written
        super().__init__(urls, batch_size, transform=None, filter=None, **kwargs)
        root = cache_root(self.urls)
        self.info = read_cache_info(root)
        self.empty_clip = torch.from_numpy(decode_npy((root / EMPTY_CAPTION).read_bytes()))  # (1, 77, width)

    def _decode(self, raw: dict[str, Any], rng: random.Random, counter: RejectCounter) -> dict[str, Any] | None:
        where = f"{raw.get('__key__')} in {raw.get('__url__')}"
        if LATENT not in raw or CLIP not in raw:
            return counter.reject("missing_cache", where)
        try:
            latent = torch.from_numpy(decode_npy(raw[LATENT]))
            clip = torch.from_numpy(decode_npy(raw[CLIP]))
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except (ValueError, OSError, UnicodeDecodeError) as exn:
            return counter.reject("bad_cache", f"{where}: {type(exn).__name__}: {exn}")
        if latent.ndim != 3 or clip.ndim != 2:
            return counter.reject("bad_cache", f"{where}: latent {tuple(latent.shape)}, clip {tuple(clip.shape)}")
        if self.require_caption and not caption:
            return counter.reject("missing_caption", where)
        counter.accept()
        return {"bucket": tuple(latent.shape[-2:]), "outputs": {"latents": latent, "clip": clip}, "caption": caption,
                "key": raw["__key__"], "meta": meta}

    def _collate(self, group: Sequence[dict[str, Any]], counter: RejectCounter) -> dict[str, Any]:
        batch = WebImageTextDataset._collate(group, counter)
        batch["empty_clip"] = self.empty_clip
        return batch

"""Frozen networks' outputs computed once (``scripts/cache_latents.py``) and streamed back without running them.

A cache is a folder of WebDataset shards, one per source shard and of the same name, plus ``empty_caption.npy`` (the
text encoder's states of "", for caption dropout) and ``cache_info.json`` (what produced it, and which arrays every
sample holds). Per sample, besides the source's ``KEY.txt`` and ``KEY.json``:

- Stage C cache: ``KEY.latent.npy``, the compressor's raw latent f (float16, (16, h, w); Stage C's ``to_prior`` is
  applied at training time), and ``KEY.clip.npy``, the text encoder's token states (float16, (77, width)).
- Stage B cache: ``KEY.stage_a.npy``, the Stage A encoder's unquantised latent of the training crop (float16,
  (4, H/4, W/4)), ``KEY.clip.npy``, and either ``KEY.latent.npy`` from a frozen compressor or, for a compressor that
  trains jointly with Stage B, its input view ``KEY.effnet.png`` (lossless, the exact uint8 view it would see online).

Arrays are plain ``.npy`` (read with ``allow_pickle=False``), so any tool can read a cache.
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
from PIL import Image

from .pipeline import RejectCounter, WebImageTextDataset
from .shards import ShardSpec
from .transforms import pil_to_uint8

LATENT, CLIP, STAGE_A, EFFNET_VIEW = "latent.npy", "clip.npy", "stage_a.npy", "effnet.png"
# what each stored file becomes in a batch
BATCH_KEYS = {LATENT: "latents", CLIP: "clip", STAGE_A: "stage_a_latents", EFFNET_VIEW: "effnet_images"}
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


def check_cache_matches(info: dict[str, Any], text_encoder: Any, needs: Sequence[str], *,
                        effnet: torch.nn.Module | None = None, effnet_key: str = "stage_b_ckpt",
                        stage_a: torch.nn.Module | None = None, effnet_scale: float | None = None) -> None:
    """Refuse to train on a cache that lacks what the stage reads (``needs``: file names such as ``LATENT``) or was
    made with other frozen networks than the run's, naming the config key to fix."""
    held = set(info.get("arrays", {}))
    missing = [name for name in needs if name not in held]
    if missing:
        raise ValueError(f"the cache holds {sorted(held)} per sample, this run needs {missing} too: write the cache "
                         f"for this stage (scripts/cache_latents.py for_stage=...; see its cache_info.json)")
    if effnet is not None and LATENT in held and info.get("effnet_sha1") != fingerprint(effnet):
        raise ValueError(f"the cache was written with another compressor ({info.get('effnet_ckpt')}) than this "
                         f"run's {effnet_key}: give the same {effnet_key}, or re-cache")
    if stage_a is not None and STAGE_A in held and info.get("stage_a_sha1") != fingerprint(stage_a):
        raise ValueError(f"the cache was written with another Stage A ({info.get('stage_a_ckpt')}) than this run's "
                         f"stage_a_ckpt: give the same stage_a_ckpt, or re-cache")
    if CLIP in held and info.get("text_encoder") != getattr(text_encoder, "config", None):
        raise ValueError(f"the cache's text encoder {info.get('text_encoder')} is not this run's stage.text_encoder "
                         f"{getattr(text_encoder, 'config', None)}")
    if effnet_scale is not None and info.get("effnet_scale") != effnet_scale:
        raise ValueError(f"the cache's compressor views are {info.get('effnet_scale')} x the image side; set "
                         f"data.effnet_scale={info.get('effnet_scale')}")


def read_cache_info(root: Path) -> dict[str, Any]:
    path = root / INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: data.urls must name shards written by scripts/cache_latents.py")
    return json.loads(path.read_text())


class CachedDataset(WebImageTextDataset):
    """Per-shape batches of a cache's samples: every array the cache holds under its batch name (``BATCH_KEYS``:
    ``latents`` (B, 16, h, w), ``clip`` (B, 77, width), ``stage_a_latents`` (B, 4, H/4, W/4), float16, and
    ``effnet_images`` uint8 like the image pipeline's), ``captions``, ``keys``, ``meta``, and ``empty_clip``
    (1, 77, width) for caption dropout.

    Streaming, shuffling, the rank/worker split, exact resume and reject counting are the image pipeline's; only the
    decoding differs (a sample missing one of the cache's files, or with unreadable ones, is skipped and counted).
    """

    def __init__(self, urls: ShardSpec, batch_size: int, **kwargs: Any) -> None:
        kwargs.pop("filter", None)  # the cache holds only samples that passed the filter when it was written
        super().__init__(urls, batch_size, transform=None, filter=None, **kwargs)
        root = cache_root(self.urls)
        self.info = read_cache_info(root)
        self.files = [name for name in BATCH_KEYS if name in self.info.get("arrays", {})]
        self.empty_clip = torch.from_numpy(decode_npy((root / EMPTY_CAPTION).read_bytes()))  # (1, 77, width)

    def _decode(self, raw: dict[str, Any], rng: random.Random, counter: RejectCounter) -> dict[str, Any] | None:
        where = f"{raw.get('__key__')} in {raw.get('__url__')}"
        if any(name not in raw for name in self.files):
            return counter.reject("missing_cache", where)
        try:
            outputs = {BATCH_KEYS[name]: _decode_file(name, raw[name]) for name in self.files}
            caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except (ValueError, OSError, UnicodeDecodeError, SyntaxError) as exn:
            return counter.reject("bad_cache", f"{where}: {type(exn).__name__}: {exn}")
        wrong = {key: tuple(value.shape) for key, value in outputs.items() if value.ndim != (2 if key == "clip" else 3)}
        if wrong:
            return counter.reject("bad_cache", f"{where}: shapes {wrong}")
        if self.require_caption and not caption:
            return counter.reject("missing_caption", where)
        counter.accept()
        bucket = tuple(value.shape[-2:] for key, value in outputs.items() if key != "clip")  # one batch, one shape
        return {"bucket": bucket, "outputs": outputs, "caption": caption, "key": raw["__key__"], "meta": meta}

    def _collate(self, group: Sequence[dict[str, Any]], counter: RejectCounter) -> dict[str, Any]:
        batch = WebImageTextDataset._collate(group, counter)
        batch["empty_clip"] = self.empty_clip
        return batch


def encode_png(view: torch.Tensor) -> bytes:
    """A uint8 (3, h, w) image losslessly as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(view.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decode_file(name: str, data: bytes) -> torch.Tensor:
    if name == EFFNET_VIEW:
        with Image.open(io.BytesIO(data)) as image:
            return pil_to_uint8(image.convert("RGB"))
    return torch.from_numpy(decode_npy(data))

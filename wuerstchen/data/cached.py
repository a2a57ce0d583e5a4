"""The cache format: frozen networks' outputs computed once (:func:`write_cache`, ``scripts/cache_latents.py``) and
streamed back without running them (:class:`CachedDataset`). What a stage stores and how it checks a cache comes from
its conditioning (``wuerstchen/conditioning.py``), which training runs on cached and online batches alike.

A cache is a folder of WebDataset shards, one per source shard and of the same name (a source whose name another
source took, /b/00000.tar after /a/00000.tar, gets a hash of its URL added), plus ``empty_caption.npy`` (the text
encoder's states of "", for caption dropout) and ``cache_info.json`` (what produced it, which arrays every sample holds,
and under ``shards`` the source of every shard name). Per sample, besides the source's ``KEY.txt`` and ``KEY.json``:

- Stage C cache: ``KEY.latent.npy``, the compressor's raw latent f (float16, (16, h, w); Stage C's ``to_prior`` is
  applied at training time), and ``KEY.clip.npy``, the text encoder's token states (float16, (77, width)).
- Stage B cache: ``KEY.stage_a.npy``, the Stage A encoder's unquantised latent of the training crop (float16,
  (4, H/4, W/4)), ``KEY.clip.npy``, and either ``KEY.latent.npy`` from a frozen compressor or, for a compressor that
  trains jointly with Stage B, its input view ``KEY.effnet.png`` (lossless, the exact uint8 view it would see online).

Arrays are plain ``.npy`` (read with ``allow_pickle=False``), so any tool can read a cache.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .buckets import BASE_MULTIPLE, AspectBuckets
from .pipeline import Planned, RejectCounter, Rejected, WebImageTextDataset, describe, read_caption, read_json
from .shards import ShardSpec, expand_shard_spec
from ..models.compressor import latent_size, view_size
from .transforms import ImageTransform, pil_to_uint8, to_model_inputs

LATENT, CLIP, STAGE_A, EFFNET_VIEW = "latent.npy", "clip.npy", "stage_a.npy", "effnet.png"
# what each stored file becomes in a batch
BATCH_KEYS = {LATENT: "latents", CLIP: "clip", STAGE_A: "stage_a_latents", EFFNET_VIEW: "effnet_images"}
EMPTY_CAPTION = "empty_caption.npy"
INFO = "cache_info.json"
log = logging.getLogger(__name__)


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
    # the fingerprint covers tensors only: a scale_factor set after training (scripts/measure_latent_scale.py)
    cached_scale = (info.get("stage_a_config") or {}).get("scale_factor")
    if stage_a is not None and STAGE_A in held and cached_scale != stage_a.scale_factor:
        raise ValueError(f"the cache's Stage A latents are divided by scale_factor={cached_scale}, this run's "
                         f"stage_a_ckpt records {stage_a.scale_factor}: re-cache with this stage_a_ckpt")
    if CLIP in held:
        from ..models.text_encoder import complete_record  # open_clip is imported only where states are compared

        recorded, ours = info.get("text_encoder"), text_encoder.config
        cached = complete_record(recorded) if recorded is not None else None  # no pad_token: made with zero padding
        if cached is not None and cached["pad_token"] != ours["pad_token"]:
            raise ValueError(f"the cache's token states were padded with pad_token={cached['pad_token']}, this "
                             f"run's stage.text_encoder pads with pad_token={ours['pad_token']}: set "
                             f"stage.text_encoder.pad_token={cached['pad_token']}, or re-cache")
        if cached != ours:
            raise ValueError(f"the cache's text encoder {recorded} is not this run's stage.text_encoder {ours}")
    if effnet_scale is not None and info.get("effnet_scale") != effnet_scale:
        raise ValueError(f"the cache's compressor views are {info.get('effnet_scale')} x the image side; set "
                         f"data.effnet_scale={info.get('effnet_scale')}")


def read_cache_info(root: Path) -> dict[str, Any]:
    path = root / INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: data.urls must name shards written by scripts/cache_latents.py")
    return json.loads(path.read_text())


# cache_info.json keys that say where things came from, not what the arrays are: free to differ between the runs
# that add shards to one folder (the networks are compared by their fingerprints).
_PROVENANCE_KEYS = ("source", "sources", "shards", "effnet_ckpt", "stage_a_ckpt")


def _source_name(url: str) -> str:
    name = Path(url.split("::")[-1].rstrip(" -")).name  # pipe:aws s3 cp s3://bucket/00001.tar - -> 00001.tar
    return name if name.endswith(".tar") else name + ".tar"


def prepare_cache_info(out: Path, info: dict[str, Any], urls: Sequence[str]) -> dict[str, Any]:
    """The ``cache_info.json`` for caching ``urls`` into ``out`` with the networks ``info`` describes: the folder's
    own info with this source and its shard names added (``shards``: name -> source URL; a URL cached before keeps
    its name). Refuses, naming the folder and the keys, a folder written with other networks, text encoder, view scale
    or bucket geometry."""
    info = json.loads(json.dumps(info))  # as the file holds it: tuples as lists
    existing: dict[str, Any] = {}
    if (out / INFO).is_file():
        existing = read_cache_info(out)
        before, now = {"multiple": BASE_MULTIPLE, **existing}, dict(info)  # caches before the key: 32-px sides
        if before.get("text_encoder") is not None and now.get("text_encoder") is not None:
            from ..models.text_encoder import complete_record  # records before pad_token existed: zero padding

            before["text_encoder"], now["text_encoder"] = map(complete_record, (before["text_encoder"],
                                                                                now["text_encoder"]))
        differing = [key for key in sorted(before.keys() & now.keys())
                     if key not in _PROVENANCE_KEYS and before[key] != now[key]]
        if differing:
            changes = "; ".join(f"{key}: {_short(before[key])} there, {_short(now[key])} now" for key in differing)
            raise ValueError(f"{out} holds a cache written with other settings ({changes}): give another out= folder, "
                             f"or delete {out / INFO} and its shards to re-cache")
    shards: dict[str, str] = dict(existing.get("shards", {}))
    known = set(shards.values())
    for url in urls:
        if url in known:
            continue
        name = _source_name(url)
        if name in shards:
            name = f"{name[:-len('.tar')]}-{hashlib.sha1(url.encode()).hexdigest()[:8]}.tar"
        shards[name] = url
        known.add(url)
    sources = list(existing.get("sources", [existing["source"]] if "source" in existing else []))
    if info.get("source") not in sources:
        sources.append(info.get("source"))
    return {**existing, **info, "sources": sources, "shards": shards}


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def header_shape(name: str, data: bytes) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of a stored file from its header alone: the ``.npy`` header, or a PNG view's size."""
    if name == EFFNET_VIEW:
        with Image.open(io.BytesIO(data)) as image:  # decoded as RGB, whatever the PNG's mode
            width, height = image.size
        return (3, height, width), "uint8"
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(buffer)
    return tuple(shape), str(dtype)


def expected_shapes(info: dict[str, Any], clip_shape: tuple[int, ...]) -> list[dict[str, tuple[int, ...]]]:
    """Every file's shape, per aspect bucket of the transform that wrote the cache (``image_size``, ``ratios``,
    ``effnet_scale`` of its ``cache_info.json``): the format above, with the networks' channels and Stage A's
    downsampling from their recorded configs (the defaults, 16 and f4 with 4 channels, for caches that lack them)."""
    if not {"image_size", "effnet_scale"} <= info.keys():
        return []
    scale = float(info["effnet_scale"])
    buckets = AspectBuckets(int(info["image_size"]), [float(r) for r in info.get("ratios", [1.0])],
                            multiple=int(info.get("multiple", BASE_MULTIPLE))).shapes  # caches before the key: 32
    c_latent = (info.get("effnet_config") or {}).get("c_latent", 16)
    stage_a = info.get("stage_a_config") or {}
    c_stage_a, factor = stage_a.get("c_latent", 4), 2 ** stage_a.get("levels", 2)
    shapes = []
    for width, height in buckets:
        view = (3, view_size(height, scale), view_size(width, scale))
        shapes.append({LATENT: (c_latent, latent_size(height, scale), latent_size(width, scale)),
                       STAGE_A: (c_stage_a, height // factor, width // factor), EFFNET_VIEW: view, CLIP: clip_shape})
    return shapes


class CachedDataset(WebImageTextDataset):
    """Per-shape batches of a cache's samples: every array the cache holds under its batch name (``BATCH_KEYS``:
    ``latents`` (B, 16, h, w), ``clip`` (B, 77, width), ``stage_a_latents`` (B, 4, H/4, W/4), float16, and
    ``effnet_images`` uint8 like the image pipeline's), ``captions``, ``keys``, ``meta``, and ``empty_clip``
    (1, 77, width) for caption dropout.

    Streaming, shuffling, the rank/worker split, exact resume and reject counting are the image pipeline's. A
    sample's plan reads the files' headers only: it is skipped as ``missing_cache`` without one of the cache's files,
    ``bad_cache`` with an unreadable one, and ``wrong_cache_shape`` when its shapes are not those of one of the
    cache's buckets (:func:`expected_shapes`: another image size, text encoder or network in the folder). Batches
    group samples by their exact shapes and dtypes, and a resumed pass skips batches without reading their arrays.
    """

    _render_reason = "bad_cache"

    def __init__(self, urls: ShardSpec, batch_size: int, **kwargs: Any) -> None:
        kwargs.pop("filter", None)  # the cache holds only samples that passed the filter when it was written
        super().__init__(urls, batch_size, transform=None, filter=None, **kwargs)
        root = cache_root(self.urls)
        self.info = read_cache_info(root)
        self.files = [name for name in BATCH_KEYS if name in self.info.get("arrays", {})]
        self.empty_clip = torch.from_numpy(decode_npy((root / EMPTY_CAPTION).read_bytes()))  # (1, 77, width)
        self.expected = [{name: shapes[name] for name in self.files}
                         for shapes in expected_shapes(self.info, tuple(self.empty_clip.shape[1:]))]

    def _plan(self, raw: dict[str, Any], rng: random.Random) -> Planned:
        missing = [name for name in self.files if name not in raw]
        if missing:
            raise Rejected("missing_cache", f"no {', '.join(missing)}")
        try:
            headers = {name: header_shape(name, raw[name]) for name in self.files}
        except Exception as exn:
            raise Rejected("bad_cache", describe(exn), exn) from exn
        self._check_shapes({name: shape for name, (shape, _) in headers.items()})
        caption = read_caption(raw, self.require_caption)
        meta = read_json(raw, required=False)
        group = tuple((BATCH_KEYS[name], shape, dtype) for name, (shape, dtype) in headers.items())
        return Planned(raw["__key__"], raw.get("__url__"), group, caption, meta, {n: raw[n] for n in self.files})

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if not self.expected:  # a cache_info.json without the geometry: at least the ranks must be right
            wrong = [f"{name} {shape}" for name, shape in shapes.items() if len(shape) != (2 if name == CLIP else 3)]
        elif shapes in self.expected:
            return
        else:  # name the files that differ from the bucket the sample is closest to
            nearest = min(self.expected, key=lambda e: sum(e[name] != shapes[name] for name in shapes))
            wrong = [f"{name} {shape} where the cache's bucket has {nearest[name]}" for name, shape in shapes.items()
                     if shape != nearest[name]]
        if wrong:
            raise Rejected("wrong_cache_shape", f"{', '.join(wrong)} ({INFO}: image_size "
                                                f"{self.info.get('image_size')}, ratios {self.info.get('ratios')}, "
                                                f"effnet_scale {self.info.get('effnet_scale')})")

    def _render(self, planned: Planned) -> dict[str, torch.Tensor]:
        return {BATCH_KEYS[name]: _decode_file(name, data) for name, data in planned.source.items()}

    def _collate(self, group: Sequence[Planned], counter: RejectCounter) -> dict[str, Any]:
        batch = super()._collate(group, counter)
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


# -- writing a cache -------------------------------------------------------------------------------------------------
_MTIME = 1_700_000_000.0  # constant member mtime: the same inputs give byte-identical shards


class _ShardBatches(IterableDataset):
    """Each loader worker decodes whole shards: yields (url, batch) per batch and (url, None) when a shard is done."""

    def __init__(self, urls: list[str], make_dataset: Callable[[str], Iterable[dict[str, Any]]]) -> None:
        super().__init__()
        self.urls, self.make_dataset = urls, make_dataset

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            for batch in self.make_dataset(url):
                yield url, batch
            yield url, None


def _shard_dataset(url: str, **kwargs: Any) -> WebImageTextDataset:
    """One source shard, read once in order (centre crops: the val transform), partial last batches included."""
    return WebImageTextDataset([url], resample=False, num_batches=None, shuffle_buffer=0, **kwargs)


class _ShardWriter:
    """One output shard, written to ``.partial`` and renamed into place on ``close``."""

    def __init__(self, dst: Path) -> None:
        self.dst, self.partial = dst, dst.with_name(dst.name + ".partial")
        self.tar = tarfile.open(self.partial, "w")
        self.count = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), _MTIME
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        os.replace(self.partial, self.dst)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sample_files(conditioning: Any, batch: dict[str, Any], dtype: torch.dtype) -> list[dict[str, bytes]]:
    """Per sample of a (model-input) batch: the cache's files (the conditioning's arrays, a trained compressor's
    input view, the caption and the source's metadata)."""
    files_of = {batch_key: name for name, batch_key in BATCH_KEYS.items()}
    arrays = {files_of[key]: value.to(dtype).cpu() for key, value in conditioning.arrays(batch).items()}
    keep_view = EFFNET_VIEW in conditioning.info()["arrays"]
    files = []
    for i in range(len(batch["keys"])):
        sample = {name: encode_npy(value[i]) for name, value in arrays.items()}
        if keep_view:
            sample[EFFNET_VIEW] = encode_png(batch["views"][i])
        sample.update(txt=batch["captions"][i].encode(), json=json.dumps(batch["meta"][i]).encode())
        files.append(sample)
    return files


def write_cache(conditioning: Any, urls: ShardSpec, out: str | os.PathLike, *, image_size: int,
                ratios: Sequence[float] = (1.0,), effnet_scale: float = 0.75, multiple: int = BASE_MULTIPLE,
                batch_size: int = 64, num_workers: int = 4, dtype: str = "float16", filter: Any = None,
                require_caption: bool = True, max_tries: int = 10, provenance: dict[str, Any] | None = None,
                rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Cache ``urls`` into ``out`` with a stage's conditioning (``wuerstchen.conditioning``: what it stores per sample,
    ``arrays``, and how ``cache_info.json`` describes its networks, ``info``): this rank's share, resumably.

    Shard i goes to rank i mod ``world_size``; ``num_workers`` loader processes decode whole shards each. A shard is
    written to ``.partial`` and renamed when complete, so a re-run skips finished shards and redoes interrupted ones.
    The views are centre crops of each sample's aspect bucket (``image_size``, ``ratios``, ``effnet_scale``,
    ``multiple``: the data settings the stage trains with, recorded), so training from the cache sees the same crop
    every epoch. The conditioning's networks run on the device they are on. ``provenance``: where the networks came
    from (paths), recorded but free to differ between runs adding shards to one folder. Returns the data counts
    (``accepted`` and the reject reasons).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = urls if isinstance(urls, str) else list(urls)
    shards = list(dict.fromkeys(expand_shard_spec(source)))  # a shard named twice is cached once
    record = {"source": source, **conditioning.info(), **(provenance or {}), "image_size": int(image_size),
              "ratios": [float(r) for r in ratios], "effnet_scale": float(effnet_scale), "dtype": dtype,
              "crop": "center", "multiple": int(multiple),
              "encoder_dtype": "float32"}  # conditioning.frozen_precision: a folder never mixes encoder precisions
    info = prepare_cache_info(out, record, shards)  # every rank refuses a mismatch
    names = {url: name for name, url in info["shards"].items()}
    if rank == 0:
        _write_atomic(out / EMPTY_CAPTION, encode_npy(conditioning.empty_caption().to(getattr(torch, dtype)).cpu()))
        _write_atomic(out / INFO, (json.dumps(info, indent=1) + "\n").encode())

    mine = [u for i, u in enumerate(shards) if i % world_size == rank]
    todo = [u for u in mine if not (out / names[u]).exists()]
    log.info("rank %d/%d: %d of %d shards to cache into %s (%d done before)", rank, world_size, len(todo), len(mine),
             out, len(mine) - len(todo))
    transform = ImageTransform(int(image_size), outputs=conditioning.image_outputs, ratios=list(ratios),
                               effnet_scale=float(effnet_scale), random_crop=False, multiple=int(multiple))
    make_dataset = functools.partial(_shard_dataset, batch_size=int(batch_size), transform=transform, filter=filter,
                                     require_caption=require_caption, max_tries=int(max_tries))
    loader = DataLoader(_ShardBatches(todo, make_dataset), batch_size=None, num_workers=min(num_workers, len(todo)))
    device = next(conditioning.text_encoder.parameters()).device
    writers: dict[str, _ShardWriter] = {}
    totals: Counter[str] = Counter()
    for url, batch in loader:
        if batch is None:  # the shard is complete
            writer = writers.pop(url, None) or _ShardWriter(out / names[url])
            writer.close()
            log.info("%s: %d samples", writer.dst.name, writer.count)
            continue
        if url not in writers:
            writers[url] = _ShardWriter(out / names[url])
        writer = writers[url]
        totals.update(batch.pop("data_stats", {}))
        batch["views"] = batch["effnet_images"]  # uint8, before to_model_inputs normalises the compressor's input
        batch = to_model_inputs(batch)
        batch = {k: v.to(device) if torch.is_tensor(v) and k != "views" else v for k, v in batch.items()}
        for key, files in zip(batch["keys"], _sample_files(conditioning, batch, getattr(torch, dtype))):
            writer.add(key, files)
    return dict(totals)

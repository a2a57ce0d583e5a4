"""Read network weights from every format users bring, and write ours and diffusers'.

Sources, detected from the path:
- a released ``.pt`` (dome272 layout): ``state_dict`` / ``ema_state_dict`` (EMA preferred) / ``effnet_state_dict``;
- a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``);
- a ``.safetensors`` file: our export (config in the metadata) or a bare state dict in either layout;
- our Lightning training checkpoint, a ``.ckpt`` file or a sharded (FSDP) folder: networks under ``state_dict`` as
  ``<stage attribute>.*``, the EMA copy as ``ema_network.*`` of the network ``ema_of`` names (preferred; older files
  keep it under ``ema[<attribute>]``), network configs under ``network_configs[<attribute>]``. Every key of ours,
  what writes and what reads it: :mod:`wuerstchen.weights.checkpoint`.

:class:`~wuerstchen.weights.checkpoint.CheckpointFile` opens any of them once and hands out its networks and records;
the functions here (:func:`load_network`, :func:`read_weights`, :func:`network_for`, :func:`checkpoint_info`) are
that reader's, over a per-process cache of the sources opened last. This module holds what the reader is built from:
the safe loading of pickles and shards, the released and diffusers layouts, and the building of a network from
weights; and the writers of our safetensors export and of diffusers folders.

Pickles are only ever read with ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused.
A sharded (FSDP) checkpoint folder's ``.metadata`` pickle is read by an unpickler that admits only the classes torch
distributed checkpoint's metadata is made of, and only the network tensors asked for are read from its shards.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.compressor import SemanticCompressor
from ..models.stage_a import StageA
from ..models.stage_b import StageB
from ..models.stage_c import StageC
from .keys import StateDict, detect_stage, diffusers_to_released, is_diffusers_layout, released_to_diffusers, \
    strip_prefixes

_DIFFUSERS = "diffusers.pipelines.deprecated.wuerstchen"


@dataclass(frozen=True)
class StageSpec:
    """How one network is built, found in released files and mapped to diffusers."""

    builder: Callable[..., nn.Module]
    attribute: str  # the network's attribute name in our LightningModules
    released_key: str  # where the released .pt keeps it
    presets: tuple[dict[str, Any], ...]  # full-size configs, matched by shape when a source carries none
    diffusers_class: str | None = None
    to_diffusers: dict[str, str] = field(default_factory=dict)  # our argument name -> diffusers' (when they differ)
    diffusers_fixed: dict[str, Any] = field(default_factory=dict)  # diffusers arguments we do not expose


STAGES: dict[str, StageSpec] = {
    "a": StageSpec(StageA, "stage_a", "state_dict", ({},), f"{_DIFFUSERS}.modeling_paella_vq_model.PaellaVQModel",
                   {"c_hidden": "embed_dim", "c_latent": "latent_channels", "codebook_size": "num_vq_embeddings"},
                   {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2}),
    "b": StageSpec(StageB, "stage_b", "state_dict", ({},),
                   f"{_DIFFUSERS}.modeling_wuerstchen_diffnext.WuerstchenDiffNeXt"),
    "c": StageSpec(StageC, "stage_c", "state_dict",
                   ({}, {"c": 1536, "depth": 32, "nhead": 24, "c_cond": 1280}),
                   f"{_DIFFUSERS}.modeling_wuerstchen_prior.WuerstchenPrior"),
    "effnet": StageSpec(SemanticCompressor, "effnet", "effnet_state_dict",
                        ({"affine": True, "latent_shift": 1.0, "latent_scale": 42.0}, {})),
}


def stage_spec(stage: str) -> StageSpec:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    return STAGES[stage]


def torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``mmap``: read tensors lazily from disk, for files in
    torch's zip format; older files are read whole)."""
    if mmap and not zipfile.is_zipfile(path):
        mmap = False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exn:  # torch raises UnpicklingError (and others) for anything beyond plain data
        if "weights_only" in str(exn) or "Unpickl" in type(exn).__name__:
            raise ValueError(
                f"{path}: refusing to load, the file needs arbitrary unpickling (it holds Python objects beyond "
                f"tensors and plain containers, which could run code). Re-save its state dict in a trusted "
                f"environment: torch.save(obj['state_dict'], 'plain.pt') or as .safetensors.") from exn
        raise


class ReadOnce:
    """Checkpoints read once per process: ``read(path)`` is kept under the resolved path while the stamp of the files
    behind it (inode, mtime and size) is unchanged; a new checkpoint under the same name replaces the old entry. Only
    the ``max_entries`` most recently used are kept."""

    def __init__(self, read: Callable[[Path], Any], files: Callable[[Path], list[Path]],
                 max_entries: int = 4) -> None:
        self.read, self.files, self.max_entries = read, files, max_entries
        self.entries: OrderedDict[Path, tuple[tuple[int, ...], Any]] = OrderedDict()

    def __call__(self, path: str | os.PathLike) -> Any:
        path = Path(path).resolve()
        stamp = tuple(n for stat in map(os.stat, self.files(path))
                      for n in (stat.st_ino, stat.st_mtime_ns, stat.st_size))
        if path in self.entries and self.entries[path][0] == stamp:
            self.entries.move_to_end(path)
            return self.entries[path][1]
        self.entries.pop(path, None)
        value = self.read(path)
        self.entries[path] = (stamp, value)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def released_state(obj: dict, stage: str, path: str, prefer_ema: bool) -> StateDict:
    """The network's tensors in a loaded released ``.pt`` (``state_dict`` / ``ema_state_dict`` /
    ``effnet_state_dict``) or a bare state dict (our checkpoints: :mod:`wuerstchen.weights.checkpoint`)."""
    candidates = ["ema_state_dict", "state_dict"] if prefer_ema else ["state_dict", "ema_state_dict"]
    if stage == "effnet":
        candidates = ["effnet_state_dict"]
    for key in candidates:
        if _is_state_dict(obj.get(key)):
            return obj[key]
    if _is_state_dict(obj):
        return obj
    raise KeyError(f"{path}: no state dict for stage {stage} (looked for {candidates}; top-level keys "
                   f"{sorted(obj)[:10]})")


def read_diffusers_folder(path: Path, stage: str) -> tuple[StateDict, dict[str, Any]]:
    """(state dict in diffusers' layout, our config) of a diffusers model folder."""
    config = json.loads((path / "config.json").read_text())
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(path / shard).items()}
    elif (path / "diffusion_pytorch_model.safetensors").exists():
        state = load_file(path / "diffusion_pytorch_model.safetensors")
    elif (path / "diffusion_pytorch_model.bin").exists():
        state = torch_load(path / "diffusion_pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{path}: a diffusers folder needs diffusion_pytorch_model.safetensors or .bin")
    return state, _config_from_diffusers(stage, config)


def read_safetensors(path: Path) -> tuple[StateDict, dict[str, Any] | None]:
    """(state dict, config) of a safetensors file: our export carries the config in its metadata, a bare one none."""
    state = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return state, json.loads(metadata["wuerstchen_config"]) if "wuerstchen_config" in metadata else None


def in_our_layout(state: StateDict, stage: str, path: str | os.PathLike) -> StateDict:
    """``state`` with wrapper prefixes stripped and diffusers' keys mapped to ours; checks that it is ``stage``'s."""
    state = strip_prefixes(state)
    if is_diffusers_layout(state):
        state = diffusers_to_released(state)
    found = detect_stage(state)
    if found != stage:
        raise ValueError(f"{path} holds {'stage ' + found if found else 'no known'} network weights, not stage "
                         f"{stage} ({len(state)} keys, e.g. {sorted(state)[:3]})")
    return state


def _config_from_diffusers(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    spec = stage_spec(stage)
    renamed = {theirs: ours for ours, theirs in spec.to_diffusers.items()}
    return {renamed.get(k, k): v for k, v in config.items()
            if not k.startswith("_") and k not in spec.diffusers_fixed}


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A training checkpoint saved under ``trainer=fsdp``: a folder of torch-distributed-checkpoint shards."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def _dcp_metadata_classes() -> frozenset[tuple[str, str]]:
    """The globals a torch distributed checkpoint ``.metadata`` pickle refers to: DCP's metadata dataclasses, the
    shard file index, tensor sizes, dtypes and layouts, the checkpoint's path."""
    metadata = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    dtypes = [name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)]
    return frozenset([("torch.distributed.checkpoint.metadata", name) for name in metadata]
                     + [("torch", name) for name in ("Size", *dtypes)]
                     + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                        ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
                     + [(module, cls) for module in ("pathlib", "pathlib._local")
                        for cls in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")])


class _DCPMetadataUnpickler(pickle.Unpickler):
    allowed = _dcp_metadata_classes()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of torch distributed checkpoint metadata")
        return super().find_class(module, name)


def read_dcp_metadata(folder: Path) -> Any:
    """``folder/.metadata`` (a torch distributed checkpoint ``Metadata``) without running code: a pickle naming any
    other class is refused, as is a shard file outside the folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = folder / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as exn:
        raise ValueError(f"{file}: refusing to load, not a plain torch distributed checkpoint metadata file "
                         f"({exn}); loading it would need arbitrary unpickling, which could run code") from exn
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{file}: holds a {type(metadata).__name__}, not torch distributed checkpoint Metadata")
    for info in (metadata.storage_data or {}).values():
        if Path(info.relative_path).name != info.relative_path:
            raise ValueError(f"{file}: names shard file {info.relative_path!r} outside the checkpoint folder")
    return metadata


class ShardedCheckpoint:
    """One sharded (FSDP) training checkpoint folder, opened: the DCP metadata and ``meta.pt`` (every entry but the
    tensors: :mod:`wuerstchen.weights.checkpoint`); :meth:`tensors` reads chosen entries from the shards, nothing
    else.

    DCP keys are Lightning's: ``state_dict.<module attribute>.<parameter>`` (the EMA copy is ``ema_network``, of the
    network ``meta["ema_of"]`` names), ``optimizer_<i>.*``; the optimizer states are never read here.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metadata = read_dcp_metadata(folder)
        self.meta: dict[str, Any] = torch_load(folder / "meta.pt")

    def tensors(self, prefix: str, values: bool = True) -> StateDict:
        """The entries under ``prefix`` (stripped), full size on the CPU (``values=False``: meta-device tensors of
        the right shapes, nothing read). Loaded by DCP on this process alone (no collective) into tensors allocated
        from the metadata's sizes and dtypes."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entries = {k: m for k, m in self.metadata.state_dict_metadata.items() if k.startswith(prefix)}
        pickled = sorted(k for k, m in entries.items() if not isinstance(m, TensorStorageMetadata))
        if pickled:  # DCP stores non-tensors as pickles that only arbitrary unpickling reads
            raise ValueError(f"{self.folder}: {pickled[:3]} are not tensors; refusing to unpickle them")
        device = "cpu" if values else "meta"
        state = {k: torch.empty(m.size, dtype=m.properties.dtype, device=device) for k, m in entries.items()}
        if values and state:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*load in a single process")
                dcp.load(state, storage_reader=_safe_reader_class()(self.folder, self.metadata), no_dist=True)
        return {k[len(prefix):]: v for k, v in state.items()}


@functools.cache
def _safe_reader_class() -> type:
    """DCP's file reader given already vetted metadata instead of running its own ``pickle.load`` (built on first use:
    importing torch.distributed.checkpoint takes most of a second)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def __init__(self, folder: Path, metadata: Any) -> None:
            super().__init__(folder)
            self.vetted_metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = copy.copy(self.vetted_metadata)
            metadata.storage_meta = copy.copy(metadata.storage_meta) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return metadata

    return SafeReader


def _opened(source: str | os.PathLike | Any) -> Any:
    from .checkpoint import open_checkpoint  # built on this module

    return open_checkpoint(source)


def clear_cache() -> None:
    """Forget every source opened so far (the next read of each goes to disk again; drops the memory maps)."""
    from .checkpoint import clear_cache as clear

    clear()


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The plain (non-tensor) top-level entries of one of our training checkpoints, a file or a sharded folder:
    ``text_encoders``, ``effnet_scale``, ``wandb_run_id``, ``global_step``, ... ({} for any other weight format and
    for a path that holds nothing)."""
    path = Path(path)
    if not (is_sharded_checkpoint(path) or path.is_file() and path.suffix != ".safetensors"):
        return {}
    return _opened(path).info


def read_weights(path: str | os.PathLike | Any, stage: str, prefer_ema: bool = True,
                 mmap: bool = False) -> tuple[StateDict, dict | None]:
    """(state dict in our layout, config or None) from any supported source (a path or an opened
    :class:`~wuerstchen.weights.checkpoint.CheckpointFile`); checks that it is ``stage``.

    ``mmap``: only the shapes are needed (sharded folders then give meta-device tensors and read no shard). Sources are
    opened once per process while unchanged and pickled files are memory-mapped: the tensors of a ``.pt``/``.ckpt``
    are shared with later reads of that file, so copy them (``load_state_dict`` does) before changing them in place.
    """
    return _opened(path).weights(stage, prefer_ema, shapes_only=mmap)


def shape_mismatches(module: nn.Module, state: StateDict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against ``module``."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and tuple(state[k].shape) != tuple(v.shape))
    return missing, unexpected, wrong


def infer_config(stage: str, state: StateDict) -> dict[str, Any]:
    """The full-size preset whose keys and shapes equal ``state``'s (released files carry no config)."""
    for preset in stage_spec(stage).presets:
        with torch.device("meta"):
            module = stage_spec(stage).builder(**preset)
        if not any(shape_mismatches(module, state)):
            return dict(preset)
    raise ValueError(f"the stage {stage} weights match no known full-size layout; give the model config "
                     f"explicitly (e.g. --config '{{\"c\": 32, \"depth\": 2, ...}}')")


RUNTIME_KEYS = frozenset({"dropout"})  # constructor options that are not architecture: never checked against weights


def _architecture(stage: str, path: str | os.PathLike, state: StateDict, stored: dict[str, Any] | None,
                  config: dict[str, Any] | None) -> dict[str, Any]:
    """The stored config (a ``config`` given as well must agree with it), else ``config``, else the full-size layout
    the shapes match."""
    if stored is not None and config is not None:
        conflicts = {k: (v, stored[k]) for k, v in config.items()
                     if k in stored and k not in RUNTIME_KEYS and stored[k] != v}
        if conflicts:
            raise ValueError(f"model config disagrees with the one stored in {path}: "
                             + ", ".join(f"{k}={a!r} vs stored {b!r}" for k, (a, b) in conflicts.items()))
    if stored is not None or config is not None:
        return {**(config or {}), **(stored or {})}
    return infer_config(stage, state)


def _check_fits(module: nn.Module, state: StateDict, path: str | os.PathLike, stage: str,
                config: dict[str, Any]) -> None:
    missing, unexpected, wrong = shape_mismatches(module, state)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit stage {stage} with config {config}: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}, wrong shape {wrong[:8]}")


def build_network(stage: str, path: str | os.PathLike, state: StateDict, stored: dict[str, Any] | None,
                  config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(network, its config): ``stage``'s network built with the ``stored`` config (a ``config`` given as well must
    agree with it), else ``config``, else the full-size layout the shapes match; ``state`` loaded strictly."""
    config = _architecture(stage, path, state, stored, config)
    module = stage_spec(stage).builder(**config)
    _check_fits(module, state, path, stage, config)
    module.load_state_dict(state, strict=True)
    return module, config


def load_network(stage: str, path: str | os.PathLike | Any, config: dict[str, Any] | None = None,
                 prefer_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network the weights at ``path`` (or an opened ``CheckpointFile``) belong to and load them strictly.

    The config comes from the source when it carries one (our checkpoints, diffusers folder, our safetensors); a
    ``config`` given as well must agree with it. Otherwise ``config`` is used, or the full-size layout the shapes match.
    """
    source = _opened(path)
    state, stored = source.weights(stage, prefer_ema)
    return build_network(stage, source.path, state, stored, config)


def network_for(stage: str, path: str | os.PathLike | Any | None, config: dict[str, Any] | None = None,
                **runtime: Any) -> nn.Module:
    """A freshly initialised network with the architecture of the weights at ``path`` (``init_from`` loads the weights
    themselves): fine-tuning configs build their network from the source instead of restating it.

    The architecture is the one the source stores (our checkpoints and exports, diffusers folders), else ``config``,
    else the full-size layout the shapes match (the released ``.pt`` files); a ``config`` that disagrees with a stored
    one is an error naming the keys. ``runtime`` options (``dropout``) are not architecture and always apply.
    """
    if not path:
        raise ValueError(f"the stage {stage} model is taken from init_from, which is not set: give init_from=PATH or "
                         f"choose a model config (model/stage_{stage}@stage.stage_{stage}=full)")
    state, stored = read_weights(path, stage, mmap=True)  # shapes only: init_from reads the values
    try:
        architecture = _architecture(stage, path, state, stored, config)
    except ValueError as exn:
        if stored is not None or config is not None:
            raise ValueError(f"init_from: {exn}") from None
        raise ValueError(f"init_from={path} carries no model config and matches no full-size stage {stage} layout: "
                         f"choose the model config explicitly (model/stage_{stage}@stage.stage_{stage}=NAME)") from None
    architecture = {k: v for k, v in architecture.items() if k not in RUNTIME_KEYS}
    module = stage_spec(stage).builder(**architecture, **runtime)
    _check_fits(module, state, path, stage, architecture)
    return module


def save_wuerstchen(state: StateDict, stage: str, config: dict[str, Any], dst: str | os.PathLike) -> None:
    """Safetensors in the released key layout, the model config in the metadata; written atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "wuerstchen_stage": stage, "wuerstchen_config": json.dumps(config)}
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, dst)


def diffusers_class(stage: str) -> type:
    spec = stage_spec(stage)
    if spec.diffusers_class is None:
        raise ValueError(f"diffusers has no class for stage {stage}; export it with --to wuerstchen")
    module_name, class_name = spec.diffusers_class.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def diffusers_config(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    spec = stage_spec(stage)
    return {**{spec.to_diffusers.get(k, k): v for k, v in config.items()}, **spec.diffusers_fixed}


def save_diffusers(state: StateDict, stage: str, config: dict[str, Any], dst: str | os.PathLike) -> None:
    """A diffusers model folder that ``<DiffusersClass>.from_pretrained(dst)`` loads with every key present."""
    cls = diffusers_class(stage)
    with torch.device("meta"):
        model = cls(**diffusers_config(stage, config))
    theirs = released_to_diffusers(state)
    missing, unexpected, wrong = shape_mismatches(model, theirs)
    if missing or unexpected or wrong:  # from_pretrained would only warn and initialise them randomly
        raise ValueError(f"stage {stage} weights do not fit {cls.__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, wrong shape {wrong[:8]}")
    model.load_state_dict({k: v.contiguous() for k, v in theirs.items()}, strict=True, assign=True)
    model.save_pretrained(dst, safe_serialization=True)

"""Our training checkpoints: every key they hold, the functions the training hooks write them with, and the reader.

A checkpoint is Lightning's dict, in one ``.ckpt`` file, or under ``trainer=fsdp`` a folder: torch distributed
checkpoint shards (``.metadata``, ``__<rank>_*.distcp``) of ``state_dict.*`` and ``optimizer_<i>.*``, and ``meta.pt``
with every other key. Each key, what writes it -> what reads it:

Lightning's
    ``pytorch-lightning_version``, ``epoch``, ``global_step``, ``loops``, ``callbacks`` (the ``Checkpointing`` and
    ``Throughput`` callbacks' states), ``optimizer_states``, ``lr_schedulers``: Lightning -> Lightning on resume;
    ``global_step`` also the resume planner (``training/resume.py``); the version marks a checkpoint as ours.
``state_dict``
    Lightning: every registered submodule as ``<attribute>.*``: the trained networks, the registered frozen ones
    (Stage A in Stage B, the compressor in Stage C), buffers (Stage A's ``code_uses``), and the EMA copy as
    ``ema_network.*`` -> resume; :class:`CheckpointFile` (networks as ``<attribute>.*``).
``<DataModule class name>`` (``WebDataModule``, ...)
    Lightning, the datamodule's ``state_dict`` (the data stream's position) -> Lightning on resume.
``network_configs``
    :func:`write_stage` (``StageModule.on_save_checkpoint``): attribute -> ``config`` of every registered network
    but the EMA copy; Stage A's measured ``scale_factor`` is part of its config (``training/latent_scale.py``
    records it, :func:`set_recorded_config`) -> :meth:`CheckpointFile.config`, from which networks are built;
    :attr:`CheckpointFile.scale_factor`.
``ema_of``
    :func:`write_stage`: the attribute of the network ``ema_network`` averages (absent without EMA) ->
    :meth:`CheckpointFile.weights` (``prefer_ema``), :func:`prepare_resume`.
``nonfinite_steps``
    :func:`write_stage`: the non-finite step counter's state -> ``StageModule.on_load_checkpoint``.
``text_encoders``
    :func:`write_text_encoders` (``DiffusionStageModule``): name -> ``TextEncoder`` config of the frozen text towers,
    which are not saved -> :meth:`CheckpointFile.text_encoder_record` (sampling, fine-tuning, Stage C's previews).
``effnet_scale``
    :func:`write_prior_sampling` (``StageCModule``): compressor view side / image side the prior trained on ->
    :attr:`CheckpointFile.effnet_scale` (sampling's latent size rule).
``latent_sizes``
    :func:`write_prior_sampling`: every latent ``[h, w]`` any rank trained on -> :attr:`CheckpointFile.latent_sizes`
    (sampling warns at other sizes); ``StageCModule.on_load_checkpoint`` (:func:`latent_sizes`).
``rng_states``
    :func:`write_run` (``Checkpointing``): every rank's generator states -> ``Checkpointing.on_load_checkpoint``.
``wandb_run_id``
    :func:`write_run`, with a wandb logger -> the training entry point, which continues that wandb run.
``lineage``
    :func:`write_run`: the start points behind the checkpoint -> ``training/resume.py`` (``lineage_of``).
``ema`` (older single-file checkpoints only)
    ``{attribute: EMA state dict}``, the EMA outside ``state_dict`` -> :class:`CheckpointFile`; :func:`prepare_resume`
    moves it into ``state_dict`` as ``ema_network.*``.

One EMA layout for every strategy: the EMA copy is the LightningModule's registered submodule ``ema_network``
(parameters without gradients, so neither the optimizer nor DDP's gradient sync sees them; FSDP shards it like its
network), saved in ``state_dict``, with ``ema_of`` naming the network it averages.

:class:`CheckpointFile` opens any weights source once (ours, a released ``.pt``, a diffusers folder, a safetensors
export) and hands out its networks, configs and records; :func:`open_checkpoint` keeps the readers of the last few
paths, so the functions of :mod:`wuerstchen.weights.formats` (``load_network``, ``checkpoint_info``, ...) called
one after another on one file read it once.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from . import formats
from .keys import StateDict

log = logging.getLogger(__name__)

# -- keys -------------------------------------------------------------------------------------------------------
LIGHTNING_VERSION = "pytorch-lightning_version"
GLOBAL_STEP = "global_step"
STATE_DICT = "state_dict"
OPTIMIZER_STATES = "optimizer_states"
LR_SCHEDULERS = "lr_schedulers"
LIGHTNING_KEYS = frozenset({LIGHTNING_VERSION, "epoch", GLOBAL_STEP, STATE_DICT, "loops", "callbacks",
                            OPTIMIZER_STATES, LR_SCHEDULERS, "hyper_parameters", "hparams_name",
                            "datamodule_hyper_parameters", "hparams_type"})

NETWORK_CONFIGS = "network_configs"
EMA_OF = "ema_of"
EMA_NETWORK = "ema_network"  # the attribute of the EMA copy, and its prefix in state_dict
NONFINITE_STEPS = "nonfinite_steps"
TEXT_ENCODERS = "text_encoders"
EFFNET_SCALE = "effnet_scale"
LATENT_SIZES = "latent_sizes"
RNG_STATES = "rng_states"
WANDB_RUN_ID = "wandb_run_id"
LINEAGE = "lineage"
LEGACY_EMA = "ema"  # older single-file checkpoints: {attribute: EMA state dict}
OUR_KEYS = frozenset({NETWORK_CONFIGS, EMA_OF, NONFINITE_STEPS, TEXT_ENCODERS, EFFNET_SCALE, LATENT_SIZES, RNG_STATES,
                      WANDB_RUN_ID, LINEAGE, LEGACY_EMA})
# besides these, Lightning saves the datamodule's state under its class name

_NOT_INFO = (STATE_DICT, OPTIMIZER_STATES, LR_SCHEDULERS, LEGACY_EMA)  # tensors: not part of CheckpointFile.info
_NOT_CONSOLIDATED = (STATE_DICT, OPTIMIZER_STATES, LR_SCHEDULERS, "loops", "callbacks")  # a folder's resume state


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded pickle is one of our (Lightning) training checkpoints rather than a released ``.pt``."""
    return isinstance(obj, dict) and (LIGHTNING_VERSION in obj or
                                      STATE_DICT in obj and isinstance(obj.get(LEGACY_EMA), dict))


def _under(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- writing (the training hooks) -------------------------------------------------------------------------------
def write_stage(checkpoint: dict[str, Any], networks: Mapping[str, nn.Module], ema_of: str | None,
                nonfinite_steps: Mapping[str, Any]) -> None:
    """``network_configs`` of the registered ``networks`` that have a ``config`` (the EMA copy left out: it is the
    network ``ema_of`` names), ``ema_of`` when an EMA is kept, ``nonfinite_steps``."""
    checkpoint[NETWORK_CONFIGS] = {name: module.config for name, module in networks.items()
                                   if hasattr(module, "config") and name != EMA_NETWORK}
    if ema_of is not None:
        checkpoint[EMA_OF] = ema_of
    checkpoint[NONFINITE_STEPS] = dict(nonfinite_steps)


def write_text_encoders(checkpoint: dict[str, Any], configs: Mapping[str, Mapping[str, Any]]) -> None:
    """How to rebuild the (unsaved) frozen text encoders: name -> ``TextEncoder`` config."""
    checkpoint[TEXT_ENCODERS] = {name: dict(config) for name, config in configs.items()}


def write_prior_sampling(checkpoint: dict[str, Any], effnet_scale: float | None,
                         latent_sizes: set[tuple[int, int]] | list[tuple[int, int]]) -> None:
    """What sampling needs from a prior: the compressor view scale it trained with and the latent sizes it saw."""
    checkpoint[EFFNET_SCALE] = effnet_scale
    checkpoint[LATENT_SIZES] = sorted([int(h), int(w)] for h, w in latent_sizes)


def write_run(checkpoint: dict[str, Any], rng_states: list[Any], lineage: list[str],
              wandb_run_id: str | None = None) -> None:
    """Per-rank generator states, the lineage of start points, the wandb run id (with a wandb logger)."""
    checkpoint[RNG_STATES] = rng_states
    if wandb_run_id is not None:
        checkpoint[WANDB_RUN_ID] = wandb_run_id
    checkpoint[LINEAGE] = list(lineage)


def set_recorded_config(checkpoint: dict[str, Any], attribute: str, **values: Any) -> None:
    """Change entries of a network's recorded config in a loaded single-file checkpoint (Stage A's measured
    ``scale_factor``, which the network and its EMA are both built with)."""
    configs = checkpoint.get(NETWORK_CONFIGS) or {}
    if attribute not in configs:
        raise KeyError(f"the checkpoint records no config of {attribute!r} (it has {sorted(configs)})")
    configs[attribute].update(values)


# -- reading back when resuming (the training hooks) ------------------------------------------------------------
def nonfinite_steps(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    return dict(checkpoint.get(NONFINITE_STEPS) or {})


def latent_sizes(checkpoint: Mapping[str, Any]) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in checkpoint.get(LATENT_SIZES) or []]


def prepare_resume(checkpoint: dict[str, Any], ema_of: str | None) -> None:
    """Bring a checkpoint about to be restored into a module to the layout it has, in place, before its
    ``state_dict`` is loaded (``ema_of``: the attribute the module's EMA averages, None without EMA).

    An older checkpoint's ``ema`` entry moves into ``state_dict`` as ``ema_network.*``; one without an EMA of
    ``ema_of`` gets the network's own weights as the EMA's start; a module without EMA drops the checkpoint's. A
    sharded checkpoint has no ``state_dict`` here (the strategy restored the module from the shards itself).
    """
    legacy = checkpoint.pop(LEGACY_EMA, None) or {}
    state = checkpoint.get(STATE_DICT)
    if state is None:
        return
    prefix = EMA_NETWORK + "."
    if ema_of is not None and ema_of in legacy:
        state.update({prefix + k: v for k, v in legacy[ema_of].items()})
        checkpoint[EMA_OF] = ema_of
    has_ema = any(k.startswith(prefix) for k in state)
    if ema_of is None and has_ema:
        log.warning("the checkpoint holds an EMA of %s, this run keeps none: dropped", checkpoint.get(EMA_OF))
        for k in [k for k in state if k.startswith(prefix)]:
            del state[k]
        checkpoint.pop(EMA_OF, None)
    elif ema_of is not None and (not has_ema or checkpoint.get(EMA_OF, ema_of) != ema_of):
        log.warning("the checkpoint holds no EMA of %s: the EMA starts from its weights", ema_of)
        for k in [k for k in state if k.startswith(prefix)]:
            del state[k]
        state.update({prefix + k: v for k, v in _under(state, ema_of + ".").items()})
        checkpoint[EMA_OF] = ema_of


# -- the reader -------------------------------------------------------------------------------------------------
class CheckpointFile:
    """One weights source, opened once: our training checkpoint (a file or a sharded folder), a released ``.pt``,
    a diffusers folder or a safetensors export.

    A pickled file is read (memory-mapped) here, a sharded folder's metadata and ``meta.pt`` too (its shards are read
    per network, only the tensors asked for). Every network, config and record comes from what was read; the tensors
    handed out are shared with the reader, so copy them (``load_state_dict`` does) before changing them in place.
    Sources other than ours record nothing: ``info`` is empty, the records are None.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._loaded: Any = None
        self._shards: formats.ShardedCheckpoint | None = None
        if formats.is_sharded_checkpoint(self.path):
            self.kind = "sharded"
            self._shards = formats.ShardedCheckpoint(self.path)
            self._meta: dict[str, Any] = self._shards.meta
        elif self.path.is_dir():
            self.kind, self._meta = "diffusers", {}
        elif self.path.suffix == ".safetensors":
            self.kind, self._meta = "safetensors", {}
        elif self.path.exists():
            self._loaded = formats.torch_load(self.path, mmap=True)
            ours = is_training_checkpoint(self._loaded)
            self.kind = "training" if ours else "pickled"
            self._meta = self._loaded if ours else {}
        else:
            raise FileNotFoundError(f"no weights at {self.path}")

    def __repr__(self) -> str:
        return f"CheckpointFile({str(self.path)!r}, kind={self.kind!r})"

    @property
    def ours(self) -> bool:
        """One of our training checkpoints (file or sharded folder)."""
        return self.kind in ("training", "sharded")

    # -- records ----------------------------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The plain top-level entries (everything but the tensors: ``state_dict``, optimizer and scheduler states),
        copied; {} for sources other than ours."""
        return {k: copy.deepcopy(v) for k, v in self._meta.items() if k not in _NOT_INFO}

    @property
    def global_step(self) -> int | None:
        return self._meta.get(GLOBAL_STEP)

    @property
    def network_configs(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._meta.get(NETWORK_CONFIGS) or {})

    @property
    def ema_of(self) -> str | None:
        """The attribute of the network the checkpoint's EMA averages (either layout), or None."""
        if self._meta.get(EMA_OF) is not None:
            return self._meta[EMA_OF]
        legacy = [name for name, state in (self._meta.get(LEGACY_EMA) or {}).items() if state]
        return legacy[0] if legacy else None

    def text_encoder_record(self, name: str = "text_encoder") -> dict[str, Any] | None:
        """The ``TextEncoder`` config recorded under ``name`` (as written: ``text_encoder.complete_record`` fills
        in what older records lack), or None."""
        record = (self._meta.get(TEXT_ENCODERS) or {}).get(name)
        return None if record is None else copy.deepcopy(dict(record))

    @property
    def effnet_scale(self) -> float | None:
        """The compressor view scale a prior trained with (Stage C checkpoints), or None."""
        scale = self._meta.get(EFFNET_SCALE)
        return None if scale is None else float(scale)

    @property
    def latent_sizes(self) -> list[tuple[int, int]] | None:
        """Every latent (h, w) a prior trained on (Stage C checkpoints), or None when not recorded."""
        return latent_sizes(self._meta) if self._meta.get(LATENT_SIZES) else None

    @property
    def scale_factor(self) -> float | None:
        """Stage A's recorded ``scale_factor`` (ours and our safetensors exports), or None."""
        config = self.config("a") if self.kind in ("training", "sharded", "safetensors") else None
        value = (config or {}).get("scale_factor")
        return None if value is None else float(value)

    def config(self, stage: str) -> dict[str, Any] | None:
        """The config recorded for ``stage``'s network, or None (released files carry none)."""
        attribute = formats.stage_spec(stage).attribute
        if self.ours:
            config = (self._meta.get(NETWORK_CONFIGS) or {}).get(attribute)
            return copy.deepcopy(config)
        if self.kind in ("diffusers", "safetensors"):
            try:
                return self.weights(stage, shapes_only=True)[1]
            except (KeyError, ValueError):
                return None
        return None

    # -- networks ---------------------------------------------------------------------------------------------
    def weights(self, stage: str, prefer_ema: bool = True,
                shapes_only: bool = False) -> tuple[StateDict, dict[str, Any] | None]:
        """(state dict in our layout, recorded config or None) of ``stage``'s network; checks that the tensors are
        ``stage``'s. ``prefer_ema``: the EMA weights when the source has them for this network. ``shapes_only``: a
        sharded folder gives meta-device tensors and reads no shard."""
        spec = formats.stage_spec(stage)
        config: dict[str, Any] | None = None
        if self.kind == "sharded":
            state = self._sharded_state(spec.attribute, prefer_ema, values=not shapes_only)
            config = self.config(stage)
        elif self.kind == "training":
            state = self._file_state(spec.attribute, prefer_ema)
            config = self.config(stage)
        elif self.kind == "pickled":
            if not isinstance(self._loaded, dict):
                raise ValueError(f"{self.path}: expected a dict of tensors or a checkpoint dict, got "
                                 f"{type(self._loaded).__name__}")
            state = dict(formats.released_state(self._loaded, stage, str(self.path), prefer_ema))
        elif self.kind == "diffusers":
            state, config = formats.read_diffusers_folder(self.path, stage)
        else:
            state, config = formats.read_safetensors(self.path)
        return formats.in_our_layout(state, stage, self.path), config

    def network(self, stage: str, config: dict[str, Any] | None = None, prefer_ema: bool = True) -> nn.Module:
        """``stage``'s network built with the recorded config (a ``config`` given as well must agree with it; without
        one, ``config``, else the full-size layout the shapes match) and its weights loaded strictly."""
        state, stored = self.weights(stage, prefer_ema)
        return formats.build_network(stage, self.path, state, stored, config)[0]

    def has(self, stage: str) -> bool:
        """Whether the source holds ``stage``'s network (reads shapes only)."""
        try:
            self.weights(stage, shapes_only=True)
        except (KeyError, ValueError):
            return False
        return True

    def consolidated(self) -> dict[str, Any]:
        """A sharded folder as one single-file checkpoint dict, in memory, on one process: every ``state_dict``
        tensor at full size (the EMA copy included, as in a single-file checkpoint) and the plain entries; the
        optimizer and loop states stay behind, unread (resume from the folder itself, on any number of ranks)."""
        if self._shards is None:
            raise ValueError(f"{self.path} is not a sharded checkpoint folder")
        out = {k: copy.deepcopy(v) for k, v in self._meta.items() if k not in _NOT_CONSOLIDATED}
        out[STATE_DICT] = self._shards.tensors(STATE_DICT + ".")
        return out

    def _file_state(self, attribute: str, prefer_ema: bool) -> StateDict:
        state = self._loaded.get(STATE_DICT) or {}
        if prefer_ema and self.ema_of == attribute:
            ema = _under(state, EMA_NETWORK + ".") or dict((self._loaded.get(LEGACY_EMA) or {}).get(attribute) or {})
            if ema:
                return ema
        own = _under(state, attribute + ".")
        if not own:
            raise KeyError(f"{self.path}: training checkpoint holds no '{attribute}.*' weights")
        return own

    def _sharded_state(self, attribute: str, prefer_ema: bool, values: bool) -> StateDict:
        assert self._shards is not None
        if prefer_ema and self.ema_of == attribute:
            ema = self._shards.tensors(f"{STATE_DICT}.{EMA_NETWORK}.", values)
            if ema:
                return ema
        state = self._shards.tensors(f"{STATE_DICT}.{attribute}.", values)
        if not state:
            raise KeyError(f"{self.path}: sharded training checkpoint holds no '{STATE_DICT}.{attribute}.*' weights")
        return state


def _stamped_files(path: Path) -> list[Path]:
    return [path / ".metadata", path / "meta.pt"] if formats.is_sharded_checkpoint(path) else [path]


_OPENED = formats.ReadOnce(CheckpointFile, _stamped_files)


def open_checkpoint(path: str | os.PathLike | CheckpointFile) -> CheckpointFile:
    """The :class:`CheckpointFile` of ``path``, opened once per process while its files are unchanged (the last few
    paths are kept); a reader is returned as it is."""
    if isinstance(path, CheckpointFile):
        return path
    if not Path(path).exists():
        raise FileNotFoundError(f"no weights at {path}")
    return _OPENED(path)


def clear_cache() -> None:
    """Forget every source opened so far (the next read of each goes to disk again; drops the memory maps)."""
    _OPENED.clear()

"""The training step of Stage C and Stage B as the benchmarks time it (``scripts/benchmark.py``,
``scripts/gpu_report.py``): the stage module's own computation, the step's agreement and the optimizer step, over
networks built from presets or model configs, online or from cached inputs; and a counter of host reads.

A step is ``DiffusionStageModule.losses`` (the stage's conditioning, online or cached, with its training-time
dropout, then the eps objective) under the run's autocast, backward, :func:`~wuerstchen.training.distributed.
step_health` (the gradients' norm and finiteness: the training step's one host read), clipping by that norm and a
fused AdamW step, as ``StageModule`` runs them under Lightning. The EMA update is left out (the released recipes
average every 100 steps). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from .models import SemanticCompressor, StageC
from .models.compressor import view_size
from .models.text_encoder import TextEncoder
from .training import StageBModule, StageCModule
from .training.distributed import clip_by_norm, parallelize, step_health

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 16, "stage_c": {"c": 128, "c_cond": 32, "depth": 4, "nhead": 4, "dropout": 0.0},
             "text": "wuerstchen-tiny-text", "effnet": {"backbone": "timm", "timm_name": "test_efficientnet"},
             "stage_b": ("tiny", {}), "stage_a": "tiny", "batch_b": 16},
    "small": {"batch": 8, "stage_c": {"c": 384, "c_cond": 32, "depth": 8, "nhead": 6, "dropout": 0.1},
              "text": "wuerstchen-tiny-text", "effnet": {"backbone": "timm", "timm_name": "test_efficientnet"},
              "stage_b": ("tiny", {"c_hidden": [64, 128, 256], "nhead": [-1, 4, 8], "blocks": [1, 2, 4],
                                   "dropout": 0.1}), "stage_a": "tiny", "batch_b": 8},
    "full": {"batch": 32, "stage_c": {"c": 1280, "c_cond": 1024, "depth": 16, "nhead": 16, "dropout": 0.1},
             "text": "ViT-H-14", "effnet": {"backbone": "torchvision"},
             "stage_b": ("full", {}), "stage_a": "full", "batch_b": 8},
}
CAPTION = "a photo of a red fox sitting in the snow next to a wooden cabin, golden hour, 35 mm"
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def from_config(group: str, name: str, **overrides: Any) -> nn.Module:
    """A network as ``configs/model/<group>/<name>.yaml`` builds it (random weights), with overrides."""
    config = OmegaConf.merge(OmegaConf.load(MODEL_CONFIGS / group / f"{name}.yaml"), overrides)
    return hydra.utils.instantiate(config)


def captions(batch: int) -> list[str]:
    return [CAPTION] * batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PriorStep:
    """Stage C: the stage's own module (``StageCModule``: its conditioning and objective, ``losses``) over a prior,
    a text encoder and a compressor, and one training step of it for a given latent size and data mode."""

    data_modes = ("online", "cached")

    def __init__(self, stage_c: nn.Module, text_encoder: TextEncoder, effnet: nn.Module, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.attach(StageCModule(stage_c=stage_c, text_encoder=text_encoder, effnet=effnet,
                                 optimizer=torch.optim.AdamW), device, dtype)

    def attach(self, module: StageCModule | StageBModule, device: torch.device, dtype: torch.dtype) -> None:
        """Step ``module`` on ``device`` under ``dtype`` autocast."""
        self.device, self.dtype = device, dtype
        self.module = module.to(device)
        self.module.frozen.to(device)
        self.setup()

    @classmethod
    def preset(cls, name: str, device: torch.device, dtype: torch.dtype) -> PriorStep:
        preset = PRESETS[name]
        return cls(StageC(c_in=16, **preset["stage_c"]), TextEncoder(model_name=preset["text"]),
                   SemanticCompressor(**preset["effnet"]), device, dtype)

    def setup(self) -> None:
        """The optimizer over the trained parameters as they are now (again after :meth:`parallelize`, which
        replaces them with shards)."""
        self.module.train()
        self.trained = self.module.network
        fused = self.device.type in ("cuda", "cpu")  # what configs/optimizer/adamw.yaml runs
        self.optimizer = torch.optim.AdamW(list(self.module.trainable_parameters()), lr=1e-4, fused=fused)

    def parallelize(self, mesh: Any = None, mp_policy: Any = None, activation_checkpointing: bool = False,
                    compile_units: bool = False, compile_backend: str = "inductor") -> None:
        """The trained network as training prepares it (:func:`~wuerstchen.training.distributed.parallelize`):
        activation checkpointing, per-unit compile, FSDP2 over ``mesh``; then a new optimizer."""
        parallelize(self.trained, mesh, mp_policy, activation_checkpointing=activation_checkpointing,
                    compile_units=compile_units, compile_backend=compile_backend)
        self.setup()

    def compile(self) -> None:
        """The whole trained network under one ``torch.compile`` (``scripts/benchmark.py --compile``)."""
        name = self.module.trained[0]
        setattr(self.module, name, torch.compile(self.trained))

    def autocast(self) -> torch.autocast:
        """bf16 autocast when asked for (FLOP counting on the meta device runs without: the count is the same)."""
        meta = self.device.type == "meta"
        return torch.autocast("cpu" if meta else self.device.type, self.dtype,
                              enabled=self.dtype != torch.float32 and not meta)

    def size(self, side: int) -> str:
        return f"{side}x{side}"

    def cached_text(self, batch: int) -> dict[str, torch.Tensor]:
        """What a cache holds of the captions: their token states and those of "" (caption dropout)."""
        text = self.module.conditioning
        return {"clip": text.text_states({"captions": captions(batch)}, rng=None), "empty_clip": text.empty_caption()}

    def inputs(self, batch: int, latent: int, data: str) -> dict[str, Any]:
        out: dict[str, Any] = {"captions": captions(batch)}
        if data == "online":  # uint8-range images already normalised: the loader's part is not timed here
            side = 32 * latent
            out["effnet_images"] = torch.randn(batch, 3, side, side, device=self.device)
            return out
        return {**out, **self.cached_text(batch), "latents": torch.randn(batch, 16, latent, latent, device=self.device)}

    def step(self, batch: dict[str, Any]) -> None:
        """One training step: the module's losses (conditioning with dropout, objective), backward, the step's
        agreement (norm and finiteness, one host read), clipping by that norm, AdamW."""
        with self.autocast():
            loss = self.module.losses(batch, train=True)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        if self.device.type != "meta":
            health = step_health(grads, self.device)
            clip_by_norm(grads, 1.0, health.norm)
        self.optimizer.step()


class DecoderStep(PriorStep):
    """Stage B: ``StageBModule`` over decoder, frozen Stage A and text encoder, and the compressor, trained jointly as
    the recipe does (the one optimizer over both); a cached frozen compressor's latents leave its gradients empty
    and AdamW skips it."""

    data_modes = ("online", "cached", "cached_frozen")

    def __init__(self, stage_b: nn.Module, effnet: nn.Module, text_encoder: TextEncoder, stage_a: nn.Module,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.attach(StageBModule(stage_b=stage_b, effnet=effnet, text_encoder=text_encoder, stage_a=stage_a,
                                 optimizer=torch.optim.AdamW), device, dtype)

    @classmethod
    def preset(cls, name: str, device: torch.device, dtype: torch.dtype) -> DecoderStep:
        preset = PRESETS[name]
        config, overrides = preset["stage_b"]
        return cls(from_config("stage_b", config, **overrides), SemanticCompressor(**preset["effnet"]),
                   TextEncoder(model_name=preset["text"]), from_config("stage_a", preset["stage_a"]), device, dtype)

    def size(self, side: int) -> str:
        return f"{side}px"

    def inputs(self, batch: int, side: int, data: str) -> dict[str, Any]:
        view = view_size(side)
        out: dict[str, Any] = {"captions": captions(batch)}
        if data == "online":
            out["images"] = torch.rand(batch, 3, side, side, device=self.device)
        else:
            out.update(self.cached_text(batch),
                       stage_a_latents=torch.randn(batch, 4, side // 4, side // 4, device=self.device))
        if data == "cached_frozen":
            out["latents"] = torch.randn(batch, 16, view // 32, view // 32, device=self.device)
        else:
            out["effnet_images"] = torch.randn(batch, 3, view, view, device=self.device)
        return out


def time_steps(bench: PriorStep, batch: dict[str, Any], steps: int, warmup: int) -> float:
    """Median seconds of ``steps`` training steps after ``warmup`` (the device synchronised around each)."""
    for _ in range(warmup):
        bench.step(batch)
    times = []
    for _ in range(steps):
        synchronize(bench.device)
        start = time.perf_counter()
        bench.step(batch)
        synchronize(bench.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[None]:
    """Within it, the device's peak memory counts from zero (CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``.cpu()``, ...)
    while ``counting``, by (operation, innermost frame in this package). On a GPU each is a stall of the host until
    the device has caught up; the CPU tests count them where no GPU can say."""

    READS = frozenset({torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                       torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu})

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        self.counting = True

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.counting and func in self.READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/wuerstchen/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "outside the package"
            self.sites[(func.__name__, where)] += 1
        return func(*args, **(kwargs or {}))

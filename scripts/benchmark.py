"""Stage C training-step throughput: samples/s, step time, peak memory, FLOPs per sample and MFU, with the frozen
encoders in the step (online) or their outputs read from a cache (cached), eager or compiled, at several latent sizes.

    python scripts/benchmark.py [--preset tiny|small|full] [--batch N] [--latent 12 24 48] [--data online cached]
                                [--compile] [--device cpu|cuda] [--dtype fp32|bf16] [--peak-tflops X]
                                [--steps 10] [--warmup 3] [--json out.json]

One step is what ``StageCModule`` does per batch: online, the compressor's forward on the images' 0.75x views
(32 x latent px) and the text encoder's forward on 77-token captions, then (both modes) the eps loss of the prior at
the official t-sampler with p2 weight, backward and an AdamW step. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` over one eager step (forward + backward; encoders included when online)
and divided by the batch. MFU = FLOPs per sample x samples/s / peak (``--peak-tflops``, default the GPU's bf16
datasheet peak; none on CPU). Presets: ``tiny`` (the demo's networks), ``small``, ``full`` (the paper's 16-block
prior, ViT-H text, EfficientNetV2-S: a GPU job). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from wuerstchen.diffusion import diffusion_loss, sample_t  # noqa: E402
from wuerstchen.models import SemanticCompressor, StageC  # noqa: E402
from wuerstchen.models.text_encoder import TextEncoder  # noqa: E402
from wuerstchen.training.callbacks import peak_tflops  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 16, "stage_c": {"c": 128, "c_cond": 32, "depth": 4, "nhead": 4, "dropout": 0.0},
             "text": "wuerstchen-tiny-text", "effnet": {"backbone": "timm", "timm_name": "test_efficientnet"}},
    "small": {"batch": 8, "stage_c": {"c": 384, "c_cond": 32, "depth": 8, "nhead": 6, "dropout": 0.1},
              "text": "wuerstchen-tiny-text", "effnet": {"backbone": "timm", "timm_name": "test_efficientnet"}},
    "full": {"batch": 32, "stage_c": {"c": 1280, "c_cond": 1024, "depth": 16, "nhead": 16, "dropout": 0.1},
             "text": "ViT-H-14", "effnet": {"backbone": "torchvision"}},
}
CAPTION = "a photo of a red fox sitting in the snow next to a wooden cabin, golden hour, 35 mm"


class Bench:
    """The networks of one preset and a step function for a given latent size and data mode."""

    def __init__(self, preset: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.prior = StageC(c_in=16, **preset["stage_c"]).to(device).train()
        self.effnet = SemanticCompressor(**preset["effnet"]).to(device).eval().requires_grad_(False)
        self.text = TextEncoder(model_name=preset["text"]).to(device)
        self.optimizer = torch.optim.AdamW(self.prior.parameters(), lr=1e-4)
        self.forward = self.prior

    def compile(self) -> None:
        self.forward = torch.compile(self.prior)

    def inputs(self, batch: int, latent: int, data: str) -> dict[str, Any]:
        if data == "online":  # uint8-range images already normalised: the loader's part is not timed here
            side = 32 * latent
            return {"effnet_images": torch.randn(batch, 3, side, side, device=self.device),
                    "captions": [CAPTION] * batch}
        with torch.no_grad():  # what a cache holds: latents and token states
            return {"latents": torch.randn(batch, 16, latent, latent, device=self.device),
                    "clip": self.text([CAPTION] * batch).to(self.device)}

    def step(self, batch: dict[str, Any]) -> None:
        autocast = torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            if "effnet_images" in batch:
                with torch.no_grad():
                    x0 = self.effnet.to_prior(self.effnet(batch["effnet_images"])).float()
                    clip = self.text(batch["captions"])
            else:
                x0, clip = batch["latents"], batch["clip"]
            t = sample_t(x0.shape[0], device=self.device)
            loss = diffusion_loss(self.forward, x0, t, torch.randn_like(x0), weighting="code", clip=clip)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(bench: Bench, batch_size: int, latent: int, data: str, steps: int, warmup: int) -> dict[str, Any]:
    batch = bench.inputs(batch_size, latent, data)
    with FlopCounterMode(display=False) as counter:
        bench.step(batch)  # eager (counting sees through compile poorly; the count is the same arithmetic)
    flops = counter.get_total_flops() / batch_size
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    for _ in range(warmup):
        bench.step(batch)
    times = []
    for _ in range(steps):
        synchronize(bench.device)
        start = time.perf_counter()
        bench.step(batch)
        synchronize(bench.device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" else None
    return {"latent": f"{latent}x{latent}", "data": data, "batch": batch_size, "step_ms": round(1e3 * step, 2),
            "samples_per_s": round(batch_size / step, 2), "gflops_per_sample": round(flops / 1e9, 3),
            "peak_mem_GB": None if peak is None else round(peak, 2),
            "achieved_tflops": flops * batch_size / step / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--latent", type=int, nargs="+", default=[3, 6, 12])
    parser.add_argument("--data", nargs="+", default=["online", "cached"], choices=["online", "cached"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd prior")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    batch_size = args.batch or preset["batch"]
    peak = args.peak_tflops or peak_tflops(device)
    bench = Bench(preset, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:
            bench.compile()
        for latent in args.latent:
            for data in args.data:
                row = measure(bench, batch_size, latent, data, args.steps, args.warmup)
                row["compile"] = compiled
                achieved = row.pop("achieved_tflops")
                row["mfu"] = round(achieved / peak, 4) if peak else None
                rows.append(row)
    for row in rows:  # cached over online at the same latent size and compile setting
        online = next((r for r in rows if r["data"] == "online" and r["latent"] == row["latent"]
                       and r["compile"] == row["compile"]), None)
        row["vs_online"] = round(row["samples_per_s"] / online["samples_per_s"], 2) if online else None
    params = sum(p.numel() for p in bench.prior.parameters())
    print(f"Stage C preset {args.preset} ({params / 1e6:.2f} M parameters), {args.dtype}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.steps} steps after "
          f"{args.warmup}; peak {peak or 'n/a'} TFLOP/s")
    keys = ["latent", "data", "compile", "batch", "step_ms", "samples_per_s", "vs_online", "gflops_per_sample",
            "peak_mem_GB", "mfu"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else str(row[k]) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "device": str(device), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

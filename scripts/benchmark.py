"""Training-step throughput of Stage C and Stage B: samples/s, step time, peak memory, FLOPs per sample and MFU, with
the frozen networks in the step (online) or their outputs read from a cache (cached), eager or compiled, at several
sizes; optionally the device-hours a schedule of N samples takes.

    python scripts/benchmark.py [--stage c|b] [--preset tiny|small|full] [--batch N] [--latent 12 24 48]
                                [--image 256 512 1024] [--data online cached cached_frozen] [--compile]
                                [--device cpu|cuda] [--dtype fp32|bf16] [--peak-tflops X] [--project SAMPLES]
                                [--steps 10] [--warmup 3] [--json out.json]

A step is the training step of ``wuerstchen.benchmarking`` (the stage module's ``losses``: its conditioning, online
or cached, with its training-time dropout, then the eps objective; backward; the step's gradient-norm agreement and
clipping; a fused AdamW step).

Stage C (``--latent``: sides of its 16-channel latent): online, the compressor's forward on the images' 0.75x views
(32 x latent px) and the text encoder's forward on 77-token captions (fp32, outside autocast, as training runs the
frozen networks); then (both modes) the eps loss of the prior at the official t-sampler with p2 weight.

Stage B (``--image``: image sides): online, the frozen Stage A encoder on the images and the text encoder, and the
compressor (fine-tuned jointly, as the recipe does) forward and backward on the 0.75x views; ``cached``: Stage A
latents and token states from a cache, the compressor still trained on its cached views; ``cached_frozen``: a frozen
compressor's latents cached too (``stage.freeze_effnet=true``). Then the decoder's eps loss, backward, AdamW.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (CPU attention included) over one eager step
(forward + backward; frozen networks included when they run in the step) and divided by the batch. MFU = FLOPs per
sample x samples/s / peak (``--peak-tflops``, default the GPU's bf16 datasheet peak; none on CPU). ``--project N`` adds
the device-hours for N training samples: measured (N / samples/s, on the device that ran) and, from the FLOPs, on A100s
(312 bf16 TFLOP/s) at 20/40/60 % MFU. ``--device meta`` counts FLOPs only, without memory or time (for presets too large
to run here).
Presets: ``tiny`` (the demo's networks), ``small``, ``full`` (the paper's networks: 16-block prior or the 4-level
decoder, ViT-H text, EfficientNetV2-S, the f4 VQGAN: a GPU job). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from wuerstchen.benchmarking import (  # noqa: E402
    PRESETS, DecoderStep, PriorStep, peak_memory, peak_memory_gb, time_steps)
from wuerstchen.training.callbacks import flop_counter, peak_tflops  # noqa: E402

A100_BF16_TFLOPS = 312.0


def measure(bench: PriorStep, batch_size: int, size: int, data: str, steps: int, warmup: int) -> dict[str, Any]:
    batch = bench.inputs(batch_size, size, data)
    with flop_counter() as counter:
        bench.step(batch)  # eager (counting sees through compile poorly; the count is the same arithmetic)
    flops = counter.get_total_flops() / batch_size
    row = {"size": bench.size(size), "data": data, "batch": batch_size, "step_ms": None, "samples_per_s": None,
           "gflops_per_sample": round(flops / 1e9, 3), "peak_mem_GB": None, "achieved_tflops": None}
    if bench.device.type == "meta":  # FLOPs only
        return row
    with peak_memory(bench.device):
        step = time_steps(bench, batch, steps, warmup)
    peak = peak_memory_gb(bench.device)
    row.update(step_ms=round(1e3 * step, 2), samples_per_s=round(batch_size / step, 2),
               peak_mem_GB=None if peak is None else round(peak, 2), achieved_tflops=flops * batch_size / step / 1e12)
    return row


def project(row: dict[str, Any], samples: float) -> dict[str, Any]:
    """Device-hours for ``samples`` training samples: measured on this device, and on A100s at fixed MFUs."""
    flops = row["gflops_per_sample"] * 1e9 * samples
    out = {f"a100_h_mfu{int(100 * mfu)}": round(flops / (A100_BF16_TFLOPS * 1e12 * mfu) / 3600) for mfu in
           (0.2, 0.4, 0.6)}
    out["device_h"] = round(samples / row["samples_per_s"] / 3600) if row["samples_per_s"] else None
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="c", choices=["b", "c"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--latent", type=int, nargs="+", default=[3, 6, 12], help="Stage C latent sides")
    parser.add_argument("--image", type=int, nargs="+", default=[64, 128, 256], help="Stage B image sides")
    parser.add_argument("--data", nargs="+", default=None, choices=list(DecoderStep.data_modes),
                        help="default: all the stage has (cached_frozen is Stage B's)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd trained network")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--project", type=float, default=None, metavar="SAMPLES",
                        help="also the device-hours for this many training samples (the paper's Stage C: 1.42e9)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    kind = DecoderStep if args.stage == "b" else PriorStep
    if set(args.data or ()) - set(kind.data_modes):
        parser.error(f"--data {sorted(set(args.data) - set(kind.data_modes))}: Stage {args.stage.upper()} has "
                     f"{list(kind.data_modes)}")
    return args


def measure_all(args: argparse.Namespace, bench: PriorStep, peak: float | None) -> list[dict[str, Any]]:
    """One row per (compile, size, data mode), each with its MFU, projection and rate relative to online."""
    sizes = args.image if args.stage == "b" else args.latent
    batch_size = args.batch or PRESETS[args.preset]["batch_b" if args.stage == "b" else "batch"]
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        if compiled:
            bench.compile()
        for size in sizes:
            for data in args.data or type(bench).data_modes:
                row = measure(bench, batch_size, size, data, args.steps, args.warmup)
                row["compile"] = compiled
                achieved = row.pop("achieved_tflops")
                row["mfu"] = round(achieved / peak, 4) if peak and achieved else None
                if args.project:
                    row.update(project(row, args.project))
                rows.append(row)
    for row in rows:  # over online at the same size and compile setting
        online = next((r for r in rows if r["data"] == "online" and r["size"] == row["size"]
                       and r["compile"] == row["compile"]), None)
        row["vs_online"] = round(row["samples_per_s"] / online["samples_per_s"], 2) \
            if online and row["samples_per_s"] else None
    return rows


def print_table(args: argparse.Namespace, bench: PriorStep, rows: list[dict[str, Any]], peak: float | None) -> None:
    device = bench.device
    params = sum(p.numel() for p in bench.trained.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type
    print(f"Stage {args.stage.upper()} preset {args.preset} ({params / 1e6:.2f} M parameters trained"
          f"{' + compressor' if args.stage == 'b' else ''}), {args.dtype}, {device} ({where}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.steps} steps after "
          f"{args.warmup}; peak {peak or 'n/a'} TFLOP/s")
    keys = ["size", "data", "compile", "batch", "step_ms", "samples_per_s", "vs_online", "gflops_per_sample",
            "peak_mem_GB", "mfu"]
    if args.project:
        keys += ["device_h", "a100_h_mfu20", "a100_h_mfu40", "a100_h_mfu60"]
        print(f"device-hours for {args.project:.3g} training samples (per device; A100: 312 bf16 TFLOP/s)")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("-" if row[k] is None else str(row[k]) for k in keys) + " |")


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    peak = args.peak_tflops or peak_tflops(device)
    kind = DecoderStep if args.stage == "b" else PriorStep
    with device if device.type == "meta" else contextlib.nullcontext():
        bench = kind.preset(args.preset, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    rows = measure_all(args, bench, peak)
    print_table(args, bench, rows, peak)
    if args.json:
        args.json.write_text(json.dumps({"stage": args.stage, "preset": args.preset, "device": str(device),
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

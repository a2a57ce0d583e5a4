"""Training-step speed of our Stage B / Stage C networks against diffusers' classes at the same config and weights.

    python scripts/bench_models.py [--stage {b,c,both}] [--preset {tiny,small,full}] [--batch N] [--latent N]
                                   [--latent-b N] [--repeats 7] [--warmup 2] [--device cpu|cuda]
                                   [--dtype fp32|bf16] [--dropout X] [--compile] [--json out.json]

One timed step is zero_grad + forward + MSE loss + backward + AdamW step, models in train mode (dropout as
configured; ``--dropout`` overrides the preset's for both networks, and the footer and ``--json`` record it).
``StageC`` runs against ``WuerstchenPrior`` and ``StageB`` against ``WuerstchenDiffNeXt``, which load our weights
through :func:`wuerstchen.weights.released_to_diffusers`. diffusers is timed twice: as constructed (what its users get:
``WuerstchenPrior`` sets the classic ``AttnProcessor``, ``WuerstchenDiffNeXt`` keeps ``Attention``'s default
``AttnProcessor2_0``) and switched to ``AttnProcessor2_0`` (SDPA, as ours). Each repeat runs every
variant once, in alternating order; the table shows the median over ``--repeats`` after ``--warmup`` steps each.
``--latent`` is Stage C's latent side (also the effnet side Stage B sees), ``--latent-b`` Stage B's Stage A latent
side. ``full`` is the paper's configs, meant for a GPU; ``small`` takes seconds per step on a CPU.

``--dropout 0`` makes both sides the same computation. At dropout > 0 they differ: ours drops attention
probabilities (the official ``nn.MultiheadAttention``), diffusers' ``Attention`` drops the attention output, so the
default 0.1 also measures what the faithful attention dropout costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from wuerstchen.models import StageB, StageC  # noqa: E402
from wuerstchen.weights import released_to_diffusers  # noqa: E402

_B_LEVELS = {"level_config": ["CT", "CTA", "CTA", "CTA"], "inject_effnet": [False, True, True, True]}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 2, "latent": 8, "latent_b": 16,
             "c": {"c_in": 16, "c": 64, "c_cond": 64, "c_r": 64, "depth": 2, "nhead": 4, "dropout": 0.1},
             "b": {"c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 2, "c_cond": 32, "c_hidden": [16, 32],
                   "nhead": [-1, 2], "blocks": [1, 1], "level_config": ["CT", "CTA"], "inject_effnet": [False, True],
                   "effnet_embd": 16, "clip_embd": 32, "kernel_size": 3, "dropout": 0.1}},
    "small": {"batch": 4, "latent": 12, "latent_b": 32,
              "c": {"c_in": 16, "c": 256, "c_cond": 256, "c_r": 64, "depth": 4, "nhead": 4, "dropout": 0.1},
              "b": {"c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 2, "c_cond": 256, "c_hidden": [64, 128, 256, 256],
                    "nhead": [-1, 4, 8, 8], "blocks": [2, 2, 4, 2], **_B_LEVELS, "effnet_embd": 16,
                    "clip_embd": 256, "kernel_size": 3, "dropout": 0.1}},
    "full": {"batch": 4, "latent": 24, "latent_b": 128,
             "c": {"c_in": 16, "c": 1280, "c_cond": 1024, "c_r": 64, "depth": 16, "nhead": 16, "dropout": 0.1},
             "b": {"c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 2, "c_cond": 1024,
                   "c_hidden": [320, 640, 1280, 1280], "nhead": [-1, 10, 20, 20], "blocks": [4, 4, 14, 4],
                   **_B_LEVELS, "effnet_embd": 16, "clip_embd": 1024, "kernel_size": 3, "dropout": 0.1}},
}
VARIANTS = ("ours", "diffusers", "diffusers+sdpa")


@dataclass
class Contender:
    """One timed variant: the module to call, its optimizer and the diffusers attention processor to set first."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    base: nn.Module
    processor: Any = None


def build_pair(stage: str, config: dict[str, Any], device: torch.device, seed: int) -> tuple[nn.Module, nn.Module]:
    """Our network (seeded init) and the diffusers class at the same config with our weights converted into it."""
    if stage == "c":
        from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior as Theirs
        ours_cls: type[nn.Module] = StageC
    else:
        from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt as Theirs
        ours_cls = StageB
    torch.manual_seed(seed)
    ours = ours_cls(**config)
    theirs = Theirs(**config)
    theirs.load_state_dict(released_to_diffusers(ours.state_dict()), strict=True)
    return ours.to(device).train(), theirs.to(device).train()


def make_inputs(stage: str, config: dict[str, Any], batch: int, latent: int, latent_b: int, device: torch.device,
                seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The forward's inputs and an MSE target of the output's shape."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(batch, generator=gen)
    if stage == "c":
        x = torch.randn(batch, config["c_in"], latent, latent, generator=gen)
        inputs: tuple[torch.Tensor, ...] = (x, r, torch.randn(batch, 77, config["c_cond"], generator=gen))
    else:
        x = torch.randn(batch, config["c_in"], latent_b, latent_b, generator=gen)
        effnet = torch.randn(batch, config["effnet_embd"], latent, latent, generator=gen)
        inputs = (x, r, effnet, torch.randn(batch, 77, config["clip_embd"], generator=gen))
    target = torch.randn(x.shape, generator=gen)
    return tuple(t.to(device) for t in inputs), target.to(device)


def contenders(ours: nn.Module, theirs: nn.Module, compile_: bool) -> list[Contender]:
    """ours, diffusers as constructed and diffusers with SDPA; the diffusers rows share one model and optimizer."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    default = next(m.processor for m in theirs.modules() if isinstance(m, Attention))
    wrap = torch.compile if compile_ else (lambda m: m)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    theirs_call = wrap(theirs)
    return [Contender("ours", wrap(ours), ours_opt, ours),
            Contender("diffusers", theirs_call, theirs_opt, theirs, default),
            Contender("diffusers+sdpa", theirs_call, theirs_opt, theirs, AttnProcessor2_0())]


def set_processor(model: nn.Module, processor: Any) -> None:
    """``set_attn_processor`` for every diffusers ``Attention`` (WuerstchenDiffNeXt lacks the method)."""
    from diffusers.models.attention_processor import Attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(who: Contender, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, device: torch.device,
               bf16: bool) -> float:
    """One zero_grad + forward + backward + AdamW step; milliseconds."""
    if who.processor is not None:
        set_processor(who.base, who.processor)
    sync(device)
    start = time.perf_counter()
    who.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.mse_loss(who.model(*inputs).float(), target)
    loss.backward()
    who.optimizer.step()
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def bench_stage(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    """Times every variant of one stage; returns the table row with all samples."""
    preset = PRESETS[args.preset]
    config, device = dict(preset[stage]), torch.device(args.device)
    if args.dropout is not None:
        config["dropout"] = args.dropout
    batch, latent = args.batch or preset["batch"], args.latent or preset["latent"]
    latent_b = args.latent_b or preset["latent_b"]
    if stage == "b" and latent_b % (config["patch_size"] * 2 ** (len(config["c_hidden"]) - 1)):
        raise SystemExit(f"--latent-b {latent_b} is not divisible by patch_size * 2^(levels - 1)")
    ours, theirs = build_pair(stage, config, device, args.seed)
    inputs, target = make_inputs(stage, config, batch, latent, latent_b, device, args.seed + 1)
    runners = contenders(ours, theirs, args.compile)
    bf16 = args.dtype == "bf16"
    for who in runners:
        for _ in range(args.warmup):
            train_step(who, inputs, target, device, bf16)
    times: dict[str, list[float]] = {who.name: [] for who in runners}
    for repeat in range(args.repeats):
        for who in runners if repeat % 2 == 0 else runners[::-1]:
            times[who.name].append(train_step(who, inputs, target, device, bf16))
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    size = f"{latent}x{latent}" if stage == "c" else f"{latent_b}x{latent_b} (effnet {latent}x{latent})"
    return {"stage": stage.upper(), "config": describe(stage, config), "batch": batch, "latent": size,
            "dropout": config["dropout"], "diffusers_default": type(runners[1].processor).__name__,
            "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2),
            **{f"{name}_ms": round(value, 1) for name, value in medians.items()},
            "ratio": round(medians["ours"] / medians["diffusers"], 3),
            "ratio_sdpa": round(medians["ours"] / medians["diffusers+sdpa"], 3), "samples_ms": times}


def describe(stage: str, config: dict[str, Any]) -> str:
    if stage == "c":
        return f"c={config['c']} depth={config['depth']} nhead={config['nhead']} c_cond={config['c_cond']}"
    hidden, blocks = ("-".join(map(str, config[key])) for key in ("c_hidden", "blocks"))
    return f"c_hidden={hidden} blocks={blocks} c_cond={config['c_cond']}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one markdown table."""
    head = ["stage", "config", "params (M)", "batch", "latent", "ours ms", "diffusers default", "diffusers ms", "ours/diffusers",
            "diffusers+SDPA ms", "ours/diffusers+SDPA"]
    keys = ["stage", "config", "params_M", "batch", "latent", "ours_ms", "diffusers_default", "diffusers_ms", "ratio",
            "diffusers+sdpa_ms", "ratio_sdpa"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---:", "---"] + ["---:"] * 4 + ["---"] + ["---:"] * 4) + "|"]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["b", "c", "both"], default="both")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch", type=int, help="default: the preset's")
    parser.add_argument("--latent", type=int, help="Stage C latent side (Stage B's effnet side); default: preset's")
    parser.add_argument("--latent-b", type=int, help="Stage B's Stage A latent side; default: the preset's")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--dropout", type=float, help="dropout of both networks (0: the same computation on both "
                        "sides); default: the preset's (0.1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours and diffusers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows and the machine here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rows = [bench_stage(stage, args) for stage in (["c", "b"] if args.stage == "both" else [args.stage])]
    info = machine()
    print(format_table(rows))
    dropouts = ", ".join(f"{row['stage']} {row['dropout']}" for row in rows)
    source = "--dropout" if args.dropout is not None else "the preset's"
    print(f"\n{args.device} {args.dtype}{' compiled' if args.compile else ''}; dropout {dropouts} ({source}); "
          f"median of {args.repeats} after {args.warmup} warm-up; " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": info,
                                         "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

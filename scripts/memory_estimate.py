"""What a Stage C fine-tune needs per GPU: weights, gradients, optimizer state, EMA, activations, frozen encoders.

    python scripts/memory_estimate.py [--model full full_1b] [--resolution 1024 2048] [--gpus 1 8]
                                      [--optimizer adamw adafactor] [--gpu-memory 80] [--json out.json]

Computed, not measured: nothing is allocated. Parameter and optimizer-state bytes come from the real networks built on
the meta device. Activation bytes are measured the same way: one training forward of the prior in bf16 (the FSDP
recipe's compute dtype) on meta tensors, summing every tensor autograd saves for the backward (storage counted once),
with attention saved the way the GPU's flash kernel saves it (q, k, v, output, log-sum-exp; no L x L matrix). With
activation checkpointing per block only each block's input stays, plus one block's activations during its
recomputation.

The layout is ``trainer=fsdp`` (``MixedPrecisionPolicy``: bf16 compute, fp32 master weights, gradients, optimizer state
and EMA, all sharded over the GPUs) or, for one GPU, ``trainer=gpu`` (bf16 autocast over the same fp32 state). Frozen
networks (text encoder, compressor) are replicated in fp32. Add ~1.5 GB per GPU for the CUDA context, the NCCL buffers
and allocator slack; the all-gathered bf16 block weights are counted (two blocks in flight).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch import nn  # noqa: E402

from wuerstchen.models.compressor import latent_size  # noqa: E402
from wuerstchen.models import SemanticCompressor, StageC  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GB = 1024**3
TEXT_TOKENS = 77
# each prior's frozen text encoder (model/text_encoder config); its parameters are counted on the meta device
TEXT_ENCODER = {"full": "vit_h", "full_1b": "vit_bigg"}


def model_config(group: str, name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS / "model"), version_base="1.3"):
        return dict(compose(config_name=f"{group}/{name}")[group])


@functools.lru_cache
def text_tower_params(name: str) -> int:
    cfg = model_config("text_encoder", name)
    cfg["pretrained"] = None
    with torch.device("meta"):
        encoder = instantiate(cfg)
    return sum(p.numel() for p in encoder.parameters())


def optimizer_state_bytes(params: list[nn.Parameter], optimizer: str) -> int:
    """fp32 state: AdamW keeps two moments per element; Adafactor (torch.optim.Adafactor, no first moment) keeps a
    row and a column second-moment vector per matrix and a full one per vector."""
    if optimizer == "adamw":
        return sum(8 * p.numel() for p in params)
    total = 0
    for p in params:
        if p.ndim >= 2:
            rows, cols = p.shape[-2], p.shape[-1]
            total += 4 * (p.numel() // (rows * cols)) * (rows + cols)
        else:
            total += 4 * p.numel()
    return total


def _flash_like_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, **_) -> torch.Tensor:
    """SDPA through the flash kernel's op: autograd then saves what flash saves on a GPU."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p)[0]


@contextmanager
def saved_bytes() -> Iterator[list[int]]:
    """Sum the bytes of every distinct storage autograd saves inside the block."""
    seen: set[int] = set()
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = id(storage) if tensor.device.type == "meta" else storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += tensor.numel() * tensor.element_size() if tensor.device.type == "meta" else storage.nbytes()
        return tensor

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_like_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield total
    finally:
        F.scaled_dot_product_attention = original


def activation_bytes(prior: StageC, side: int, c_cond: int) -> tuple[int, int]:
    """(all saved activations, the per-block inputs alone) of one sample at latent side ``side``, bf16."""
    x = torch.randn(1, prior.config["c_in"], side, side, device="meta", dtype=torch.bfloat16)
    r = torch.rand(1, device="meta", dtype=torch.bfloat16)
    clip = torch.randn(1, TEXT_TOKENS, c_cond, device="meta", dtype=torch.bfloat16)
    prior.train()
    with saved_bytes() as total:
        prior(x, r, clip)
    block_inputs = prior.depth * prior.config["c"] * side * side * 2
    return total[0], block_inputs


@functools.lru_cache
def effnet_params() -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in SemanticCompressor(backbone="torchvision").parameters())


@functools.lru_cache
def prior_on_meta(model: str) -> StageC:
    cfg = {k: v for k, v in model_config("stage_c", model).items() if k != "_target_"}
    with torch.device("meta"):
        return StageC(**cfg).to(torch.bfloat16)


@functools.lru_cache
def prior_activations(model: str, side: int) -> tuple[int, int]:
    prior = prior_on_meta(model)
    return activation_bytes(prior, side, prior.config["c_cond"])


def estimate(model: str, resolution: int, gpus: int, optimizer: str, checkpointing: bool, batch: int) -> dict:
    prior = prior_on_meta(model)
    params = list(prior.parameters())
    count = sum(p.numel() for p in params)
    side = latent_size(resolution)
    full, inputs = prior_activations(model, side)
    per_block = full / prior.depth
    acts = batch * ((inputs + per_block) if checkpointing else full)
    largest_block = max(sum(p.numel() for p in prior.blocks[i].parameters()) for i in range(len(prior.blocks)))
    sharded = (4 * count + 4 * count + optimizer_state_bytes(params, optimizer) + 4 * count) / gpus
    gathered = 2 * 2 * 3 * largest_block if gpus > 1 else 0  # a [Res, Time, Attn] layer in bf16, two in flight
    frozen = 4 * (text_tower_params(TEXT_ENCODER[model]) + effnet_params())
    total = sharded + gathered + frozen + acts
    return {"model": model, "params_M": round(count / 1e6, 1), "resolution": resolution, "latent": f"{side}x{side}",
            "gpus": gpus, "optimizer": optimizer, "checkpointing": checkpointing, "batch_per_gpu": batch,
            "state_GB": round(sharded / GB, 2), "frozen_GB": round(frozen / GB, 2),
            "activations_GB": round(acts / GB, 2), "total_GB": round((total + 1.5 * GB) / GB, 1),
            "activation_GB_per_sample": round(((inputs + per_block) if checkpointing else full) / GB, 3)}


def max_batch(row: dict, gpu_memory: float) -> int:
    fixed = row["total_GB"] - row["activations_GB"]
    return max(0, int((gpu_memory - fixed) // row["activation_GB_per_sample"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["full", "full_1b"], choices=sorted(TEXT_ENCODER))
    parser.add_argument("--resolution", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--optimizer", nargs="+", default=["adamw", "adafactor"], choices=["adamw", "adafactor"])
    parser.add_argument("--batch", type=int, default=8, help="samples per GPU for the total column")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU, for the max-batch column")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for model in args.model:
        for resolution in args.resolution:
            for gpus in args.gpus:
                for optimizer in args.optimizer:
                    for checkpointing in (False, True):
                        row = estimate(model, resolution, gpus, optimizer, checkpointing, args.batch)
                        row[f"max_batch_{args.gpu_memory:g}GB"] = max_batch(row, args.gpu_memory)
                        rows.append(row)
    keys = ["model", "params_M", "resolution", "latent", "gpus", "optimizer", "checkpointing", "state_GB",
            "frozen_GB", "activation_GB_per_sample", "activations_GB", "total_GB", f"max_batch_{args.gpu_memory:g}GB"]
    print(f"computed (not measured); total at batch {args.batch} per GPU, +1.5 GB CUDA/NCCL overhead")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What preemption costs: the ranks' per-step agreement on the signal flag, and the time from the signal to a
finished checkpoint for the tiny and the paper-size Stage C.

    python scripts/bench_preemption.py [--presets tiny full full_1b] [--steps 2000] [--dir /scratch]

- ``agreement``: two gloo processes on this machine all-reduce the flag (a float scalar, ``max``) and read it on the
  host, as ``training.preemption.Preemption`` does every optimizer step; microseconds per step.
- ``checkpoint``: the bytes a Stage C checkpoint holds (fp32 weights, their EMA, AdamW's two moments; counted from
  the network built on the meta device), and the time ``torch.save`` + fsync takes to write it into ``--dir``.
  Presets up to ``--measure-up-to`` parameters are written for real, larger ones are projected from the bandwidth
  of the largest real write. The signal lands at a random moment of a step, so signal-to-checkpoint is at
  most one step more than this (plus the agreement); with FSDP each rank writes only its shard.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from wuerstchen.weights import checkpoint as schema

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "stage_c"


def _agreement_worker(rank: int, port: int, steps: int, out: "mp.Queue") -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flag = torch.zeros(())
    for _ in range(50):  # warm-up
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    start = time.perf_counter()
    for _ in range(steps):
        value = torch.tensor(0.0)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        bool(value.item())
    if rank == 0:
        out.put((time.perf_counter() - start) / steps)
    dist.destroy_process_group()


def agreement_us(steps: int) -> float:
    port = 29500 + os.getpid() % 1000
    out = mp.get_context("spawn").Queue()
    mp.spawn(_agreement_worker, args=(port, steps, out), nprocs=2, join=True)
    return out.get() * 1e6


def stage_c(preset: str, device: str) -> torch.nn.Module:
    config = OmegaConf.load(MODEL_CONFIGS / f"{preset}.yaml")
    with torch.device(device):
        return hydra.utils.instantiate(config)


def checkpoint_state(network: torch.nn.Module) -> dict:
    """What a Stage C checkpoint holds (``wuerstchen/weights/checkpoint.py``): the weights and the EMA copy in the
    state dict, and AdamW's first and second moments."""
    weights = {k: v.detach() for k, v in network.state_dict().items()}
    state = {f"stage_c.{k}": v for k, v in weights.items()}
    state.update({f"{schema.EMA_NETWORK}.{k}": v.clone() for k, v in weights.items()})
    return {schema.STATE_DICT: state, schema.EMA_OF: "stage_c",
            "optimizer_states": [{"state": {i: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                                            for i, p in enumerate(network.parameters())}}]}


def write_seconds(state: dict, directory: Path) -> float:
    path = directory / "bench.ckpt"
    start = time.perf_counter()
    torch.save(state, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "full", "full_1b"])
    parser.add_argument("--steps", type=int, default=2000, help="all-reduces timed for the agreement")
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints are written (default: a temp dir)")
    parser.add_argument("--measure-up-to", type=float, default=5e8, help="parameters written for real, at most")
    args = parser.parse_args()

    print(f"agreement: {agreement_us(args.steps):.0f} us per optimizer step (2 gloo ranks, this machine)")
    rows, bandwidth, largest = [], None, 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for preset in args.presets:
            params = sum(p.numel() for p in stage_c(preset, "meta").parameters())
            gigabytes = 4 * params * 4 / 1e9  # fp32 weights + EMA + 2 AdamW moments
            if params <= args.measure_up_to:
                seconds = write_seconds(checkpoint_state(stage_c(preset, "cpu")), Path(tmp))
                if params > largest:  # small writes end in the page cache's burst: project from the largest
                    bandwidth, largest = gigabytes / seconds, params
                how = "measured"
            else:
                seconds = gigabytes / bandwidth if bandwidth else float("nan")
                how = f"projected at {bandwidth:.2f} GB/s" if bandwidth else "no bandwidth measured"
            rows.append((preset, params, gigabytes, seconds, how))
    print("\n| Stage C preset | parameters | checkpoint GB | save + fsync s | |")
    print("|---|---:|---:|---:|---|")
    for preset, params, gigabytes, seconds, how in rows:
        print(f"| {preset} | {params / 1e6:,.1f} M | {gigabytes:.3f} | {seconds:.2f} | {how} |")


if __name__ == "__main__":
    main()

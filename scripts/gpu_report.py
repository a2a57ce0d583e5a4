"""The GPU report: one command that turns a lent GPU's minutes into the measured tables of docs/benchmarks.md.

    python scripts/gpu_report.py [--out runs/gpu_report] [--budget-s 360] [--peak-tflops X] [--memory-budget-gb G]
                                 [--only CASE ...] [--smoke]
    make gpu-report              # the same with the defaults

Every case is a training step (or a part of the input side) of the real code at the sizes the recipes train at, on
random weights (speed does not depend on them), in bf16 autocast over fp32 weights as ``trainer=gpu`` runs:

- Stage C, the paper's 16-block prior at 24x24 and the released 1B layout at 24x24 and 48x48, from cached inputs and
  (1B, 24x24) with its encoders online: eager; each unit compiled as ``trainer.strategy.compile_blocks`` does
  (first-step time reported apart, with the graphs compiled per bucket shape and the recompiles of a second pass);
  FSDP2 on one rank (bf16 parameters, fp32 reduction: ``trainer=fsdp``); the largest batch that fits the memory
  budget with and without activation checkpointing.
- Stage B at the paper's size at 512 and 1024 px, the compressor fine-tuned jointly, Stage A and the text encoder
  online: eager, channels-last, compiled.
- Attention: which SDPA kernel runs for Stage C's shape with the official attention dropout, and each kernel's time.
- The step's host synchronisations (CUDA's sync debug mode) and reads; the AdamW step fused / foreach / per tensor.
- The input side: loader samples/s per worker for online 1024 px Stage B batches and for cached Stage C batches,
  against the measured step rates: which one is the bottleneck.

Columns: step ms (median), samples/s, TFLOP/s (model FLOPs of one eager step, ``FlopCounterMode``, over the time;
recomputation under activation checkpointing is not counted), MFU against the chip's bf16 dense peak
(``--peak-tflops``, else detected from the device name), peak memory (``torch.cuda.max_memory_allocated``). A case
that does not fit, compile or run is recorded with its error instead of failing the report; cases run in priority
order and the report stops starting new ones before ``--budget-s``. Writes ``report.md`` and ``report.json`` into
``--out`` (after every case, so a killed run keeps what it measured) and prints the Markdown.

``--smoke`` runs every case at tiny sizes on the CPU (``aot_eager`` compile), in a minute: the test suite runs it so
the report cannot rot unseen.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from wuerstchen.benchmarking import (  # noqa: E402
    DecoderStep, HostReads, PriorStep, from_config, peak_memory, peak_memory_gb, synchronize, time_steps)
from wuerstchen.conditioning import StageCConditioning  # noqa: E402
from wuerstchen.data import ImageTransform, WebImageTextDataset  # noqa: E402
from wuerstchen.data.buckets import AspectBuckets  # noqa: E402
from wuerstchen.data.cached import CachedDataset, write_cache  # noqa: E402
from wuerstchen.data.synthetic import write_synthetic_shards  # noqa: E402
from wuerstchen.models import SemanticCompressor, StageC  # noqa: E402
from wuerstchen.models.compressor import latent_size  # noqa: E402
from wuerstchen.models.text_encoder import TextEncoder  # noqa: E402
from wuerstchen.training.callbacks import flop_counter, peak_tflops  # noqa: E402

# The paper's implied Stage C rate: ~16 samples/s per A100 (312 bf16 TFLOP/s) for the 1B prior at 12x12-24x24,
# encoders online (arXiv 2306.00637: 24,602 A100-hours for 1.42e9 samples).
PAPER_SAMPLES_PER_S, PAPER_PEAK = 16.0, 312.0
TINY_TEXT = "wuerstchen-tiny-text"
TINY_EFFNET = {"backbone": "timm", "timm_name": "test_efficientnet"}


# ------------------------------------------------------------------------------------------------------ networks
@dataclass(frozen=True)
class Net:
    """One network of the report: how to build its step, its batch, sizes (Stage C latent sides, Stage B pixels)."""

    name: str
    build: Callable[[torch.device, torch.dtype], PriorStep]
    batch: int
    sizes: tuple[int, ...]


def _prior(config: str, text: str, **smoke: Any) -> Callable[[torch.device, torch.dtype], PriorStep]:
    def build(device: torch.device, dtype: torch.dtype) -> PriorStep:
        with device:  # built where it runs: a 1B network initialises in seconds on the GPU
            if smoke:
                return PriorStep(StageC(c_in=16, **smoke), TextEncoder(model_name=TINY_TEXT),
                                 SemanticCompressor(**TINY_EFFNET), device, dtype)
            return PriorStep(from_config("stage_c", config), TextEncoder(model_name=text),
                             SemanticCompressor(backbone="torchvision"), device, dtype)
    return build


def _decoder(smoke: bool) -> Callable[[torch.device, torch.dtype], PriorStep]:
    def build(device: torch.device, dtype: torch.dtype) -> PriorStep:
        with device:
            if smoke:
                return DecoderStep(from_config("stage_b", "tiny"), SemanticCompressor(**TINY_EFFNET),
                                   TextEncoder(model_name=TINY_TEXT), from_config("stage_a", "tiny"), device, dtype)
            return DecoderStep(from_config("stage_b", "full"), SemanticCompressor(backbone="torchvision"),
                               TextEncoder(model_name="ViT-H-14"), from_config("stage_a", "full"), device, dtype)
    return build


def networks(smoke: bool) -> dict[str, Net]:
    if smoke:
        return {"c16": Net("Stage C 16-block (smoke: c=64, 2 blocks)", _prior("", "", c=64, c_cond=32, depth=2,
                                                                              nhead=4), 2, (4,)),
                "c1b": Net("Stage C 1B (smoke: c=96, 3 blocks)", _prior("", "", c=96, c_cond=32, depth=3, nhead=4),
                           2, (4, 6)),
                "b": Net("Stage B (smoke: tiny)", _decoder(True), 2, (64, 128))}
    return {"c16": Net("Stage C 16-block (paper, 347M)", _prior("full", "ViT-H-14"), 32, (24,)),
            "c1b": Net("Stage C 1B (released v2 layout, 994M)", _prior("full_1b", "ViT-bigG-14"), 32, (24, 48)),
            "b": Net("Stage B (paper, 1.06B)", _decoder(False), 8, (512, 1024))}


# ---------------------------------------------------------------------------------------------------- the report
@dataclass
class Report:
    """The rows measured so far, by table, written out after every case."""

    out: Path
    header: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, table: str, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(row)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("report.json", json.dumps({"machine": self.header, "tables": self.tables,
                                                       "notes": self.notes}, indent=1, default=str) + "\n"),
                           ("report.md", self.markdown())):
            partial = self.out / f".{name}.partial"  # a report stopped mid-write keeps the previous whole file
            partial.write_text(text)
            os.replace(partial, self.out / name)

    def markdown(self) -> str:
        lines = ["# GPU report", "", " | ".join(f"{k}: {v}" for k, v in self.header.items()), ""]
        for name, rows in self.tables.items():
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += [f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
            lines.append("")
        if self.notes:
            lines += ["## Notes", "", *[f"- {note}" for note in self.notes], ""]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/").replace("\n", " ")


def _error(exn: BaseException) -> str:
    text = f"{type(exn).__name__}: {exn}".splitlines()[0]
    return text[:160]


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    peak: float | None
    smoke: bool
    memory_budget_gb: float
    steps: int
    warmup: int
    compile_backend: str
    report: Report
    nets: dict[str, Net]
    work: Path
    flops: dict[tuple[str, int, str], float] = field(default_factory=dict)  # (net, size, data) -> FLOPs per sample
    rates: dict[tuple[str, int, str], float] = field(default_factory=dict)  # eager samples/s, for the loader verdict
    _built: dict[str, PriorStep] = field(default_factory=dict)

    def bench(self, net: str) -> PriorStep:
        """The eager step of ``net``, built once (other networks' eager steps are freed first: memory)."""
        if net not in self._built:
            self.free()
            self._built[net] = self.nets[net].build(self.device, self.dtype)
        return self._built[net]

    def fresh(self, net: str) -> PriorStep:
        """A new step of ``net`` for a variant that changes it for good (compile, FSDP)."""
        self.free()
        return self.nets[net].build(self.device, self.dtype)

    def free(self) -> None:
        self._built.clear()
        release(self.device)


def release(device: torch.device) -> None:
    """Return what no case holds any more: compiled and FSDP-wrapped networks sit in reference cycles, which only a
    collection frees, and until then their weights count in the next case's peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_flops(ctx: Context, net: str, bench: PriorStep, size: int, data: str, batch: dict[str, Any]) -> float:
    """FLOPs per sample of one eager step (counted once per network, size and data mode)."""
    key = (net, size, data)
    if key not in ctx.flops:
        with flop_counter() as counter:
            bench.step(batch)
        ctx.flops[key] = counter.get_total_flops() / len(batch["captions"])
    return ctx.flops[key]


def step_row(ctx: Context, net: str, bench: PriorStep, size: int, data: str, batch_size: int, variant: str,
             flops_from: PriorStep | None = None, **extra: Any) -> dict[str, Any]:
    """Time ``bench``'s step at one size; FLOPs from an eager step (``flops_from``, default ``bench`` itself)."""
    batch = bench.inputs(batch_size, size, data)
    flops = model_flops(ctx, net, flops_from or bench, size, data, flops_from.inputs(batch_size, size, data)
                        if flops_from is not None else batch)
    with peak_memory(ctx.device):
        seconds = time_steps(bench, batch, ctx.steps, ctx.warmup)
        peak = peak_memory_gb(ctx.device)
    tflops = flops * batch_size / seconds / 1e12
    return {"network": ctx.nets[net].name, "size": bench.size(size), "data": data, "variant": variant,
            "batch": batch_size, **extra, "step_ms": 1e3 * seconds, "samples_per_s": batch_size / seconds,
            "tflops": tflops, "mfu": tflops / ctx.peak if ctx.peak else None, "peak_mem_GB": peak}


# ------------------------------------------------------------------------------------------------------- the cases
def eager(net: str, size_index: int, data: str) -> Callable[[Context], None]:
    def case(ctx: Context) -> None:
        bench, spec = ctx.bench(net), ctx.nets[net]
        if size_index >= len(spec.sizes):
            return
        size = spec.sizes[size_index]
        batch = spec.batch if size_index == 0 else max(1, spec.batch // 4)  # 4x the tokens: a quarter of the batch
        row = step_row(ctx, net, bench, size, data, batch, "eager")
        ctx.rates[(net, size, data)] = row["samples_per_s"]
        ctx.report.add("training steps", row)
        if net == "c1b" and data == "online" and size == spec.sizes[0] and ctx.peak:
            ratio = (row["samples_per_s"] / ctx.peak) / (PAPER_SAMPLES_PER_S / PAPER_PEAK)
            ctx.report.notes.append(
                f"1B prior, encoders online at {bench.size(size)}: {row['samples_per_s']:.1f} samples/s; per peak "
                f"TFLOP/s that is {ratio:.2f}x the paper's implied ~16 samples/s per A100 (312 TFLOP/s).")
    return case


def channels_last(ctx: Context) -> None:
    """Stage B with its networks and inputs in channels-last memory format (``stage.channels_last``)."""
    bench, spec = ctx.bench("b"), ctx.nets["b"]
    bench.module.to_channels_last()
    bench.setup()
    try:
        ctx.report.add("training steps", step_row(ctx, "b", bench, spec.sizes[0], "online", spec.batch,
                                                   "channels_last"))
    finally:
        for name in (*bench.module.trained, *bench.module.frozen_modules):
            getattr(bench.module, name).to(memory_format=torch.contiguous_format)
        bench.setup()


def image_side(latent: int) -> int:
    """The smallest image side (a multiple of 32) whose 0.75x compressor view gives a Stage C latent this large."""
    return next(side for side in range(32, 32 * 1024, 32) if latent_size(side) >= latent)


def bucket_latents(ctx: Context, net: str) -> list[tuple[int, int]]:
    """Stage C latent shapes (h, w) of up to three aspect buckets around the network's first size (each new one
    compiles every unit's forward and backward again: cold, that is the case's cost)."""
    shapes = AspectBuckets(image_side(ctx.nets[net].sizes[0]), ratios=[1.0, 1.5, 2.0], multiple=32).shapes
    return list(dict.fromkeys((latent_size(h), latent_size(w)) for w, h in shapes))[:3]


def compiled(net: str) -> Callable[[Context], None]:
    """Every unit compiled (static shapes) as training's ``compile_blocks``: first-step time, step time, and the
    graphs compiled at the first and second batch of each bucket shape (the first batch of the first size compiled
    already; a second batch must compile nothing)."""
    def case(ctx: Context) -> None:
        from torch._dynamo import reset
        from torch._dynamo.utils import counters

        bench = ctx.fresh(net)
        try:
            compiled_rows(ctx, net, bench, counters)
        finally:
            del bench
            reset()  # the compiled graphs of this network
    return case


def compiled_rows(ctx: Context, net: str, bench: PriorStep, counters: Any) -> None:
    """:func:`compiled`'s rows for one freshly built network."""
    from torch._dynamo import reset

    spec = ctx.nets[net]
    bench.parallelize(compile_units=True, compile_backend=ctx.compile_backend)
    size = spec.sizes[0]
    data = "cached" if net != "b" else "online"
    batch = bench.inputs(spec.batch, size, data)
    reset()
    synchronize(ctx.device)
    start = time.perf_counter()
    bench.step(batch)
    synchronize(ctx.device)
    first = time.perf_counter() - start
    row = step_row(ctx, net, bench, size, data, spec.batch, f"compiled ({ctx.compile_backend})",
                   flops_from=ctx.bench(net) if (net, size, data) not in ctx.flops else None,
                   first_step_s=first)
    ctx.report.add("training steps", row)
    if net == "b":
        return
    graphs = []
    for shape in bucket_latents(ctx, net):  # a bucket's latents: shapes the cached stream gives
        cached = {**bench.cached_text(spec.batch), "captions": batch["captions"],
                  "latents": torch.randn(spec.batch, 16, *shape, device=ctx.device)}
        for _ in range(2):
            before = counters["stats"]["unique_graphs"]
            bench.step(cached)
            graphs.append((shape, counters["stats"]["unique_graphs"] - before))
    ctx.report.add("compiled graphs per bucket shape", {
        "network": spec.name, "shapes": " ".join(f"{h}x{w}" for (h, w), _ in graphs[::2]),
        "graphs at first batch": " ".join(str(n) for _, n in graphs[::2]),
        "graphs at second batch": " ".join(str(n) for _, n in graphs[1::2])})


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[Any]:
    """A process group of this process alone and its device mesh (FSDP2 on one rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120), **options)
    try:
        yield init_device_mesh(device.type, (1,))
    finally:
        dist.destroy_process_group()


def fsdp(net: str) -> Callable[[Context], None]:
    """FSDP2 on one rank with ``trainer=fsdp``'s policy: what sharding costs where there is nothing to share."""
    def case(ctx: Context) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        spec = ctx.nets[net]
        size, data = spec.sizes[0], "cached" if net != "b" else "online"
        flops_from = ctx.bench(net) if (net, size, data) not in ctx.flops else None
        if flops_from is not None:
            model_flops(ctx, net, flops_from, size, data, flops_from.inputs(spec.batch, size, data))
        bench = ctx.fresh(net)
        param_dtype = torch.bfloat16 if ctx.device.type == "cuda" else None  # the CPU tests' param_dtype=null
        with one_rank_group(ctx.device) as mesh:
            bench.parallelize(mesh, MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
            ctx.report.add("training steps", step_row(ctx, net, bench, size, data, spec.batch, "fsdp2 (1 rank)"))
    return case


def largest_batch(net: str) -> Callable[[Context], None]:
    """The largest batch (doubling) whose step peaks within ``--memory-budget-gb``, without and with activation
    checkpointing, and its rate."""
    def case(ctx: Context) -> None:
        bench = ctx.bench(net)
        try:
            for checkpointing in (False, True):
                bench.trained.grad_checkpointing = checkpointing
                ctx.report.add("largest batch in the memory budget", search_batch(ctx, net, bench))
        finally:
            bench.trained.grad_checkpointing = False
    return case


def _out_of_memory(exn: BaseException) -> bool:
    """CUDA's allocator raises OutOfMemoryError; cuBLAS and cuDNN report a failed workspace as a RuntimeError."""
    return isinstance(exn, torch.OutOfMemoryError) or any(text in str(exn) for text in ("out of memory",
                                                                                        "ALLOC_FAILED"))


def search_batch(ctx: Context, net: str, bench: PriorStep) -> dict[str, Any]:
    """Double the batch from half the network's until a step peaks past the budget or runs out of memory; the row
    of the largest that fitted, timed."""
    spec = ctx.nets[net]
    size, data = spec.sizes[0], "cached" if net != "b" else "online"
    checkpointing = bench.trained.grad_checkpointing
    fits, batch, note, probes = None, max(1, spec.batch // 2), "", 2 if ctx.smoke else 8
    for _ in range(probes):
        try:
            with peak_memory(ctx.device):
                time_steps(bench, bench.inputs(batch, size, data), steps=1, warmup=1)
                peak = peak_memory_gb(ctx.device)
        except RuntimeError as exn:  # OutOfMemoryError is one
            if not _out_of_memory(exn):
                raise
            note = f"batch {batch}: out of memory"
            break
        finally:
            bench.optimizer.zero_grad(set_to_none=True)
        if peak is not None and peak > ctx.memory_budget_gb:
            note = f"batch {batch}: {peak:.1f} GB"
            break
        fits, batch = batch, batch * 2
    if fits is None:
        return {"network": spec.name, "size": bench.size(size), "activation checkpointing": checkpointing,
                "batch": None, "next": note}
    row = step_row(ctx, net, bench, size, data, fits, "checkpointed" if checkpointing else "eager")
    return {"network": spec.name, "size": row["size"], "activation checkpointing": checkpointing,
            "budget_GB": ctx.memory_budget_gb, "batch": fits, "samples_per_s": row["samples_per_s"],
            "mfu": row["mfu"], "peak_mem_GB": row["peak_mem_GB"], "next": note or f"stopped at {probes} probes"}


def attention(ctx: Context) -> None:
    """Stage C's attention at its first size (queries: the latent's tokens; keys: those and 77 text tokens) with the
    official dropout on the probabilities and without: the kernel SDPA picks, and each kernel's forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bench, spec = ctx.bench("c16"), ctx.nets["c16"]
    block = next(m for m in bench.trained.modules() if type(m).__name__ == "MultiheadAttention")
    heads, width = block.nhead, block.in_proj_weight.shape[1]
    tokens = spec.sizes[0] ** 2
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32

    def run(dropout: float) -> None:
        q = torch.randn(spec.batch, heads, tokens, width // heads, device=ctx.device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(spec.batch, heads, tokens + 77, width // heads, device=ctx.device, dtype=dtype,
                            requires_grad=True) for _ in range(2))
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout).sum().backward()

    for dropout in (0.1, 0.0):
        with torch.profiler.profile() as prof:
            run(dropout)
        picked = sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")
                         or e.name.startswith("aten::_flash") or e.name.startswith("aten::_efficient")})
        row: dict[str, Any] = {"shape": f"B={spec.batch} heads={heads} q={tokens} kv={tokens + 77} "
                                        f"d={width // heads} {str(dtype).removeprefix('torch.')}",
                               "dropout_p": dropout, "default kernel": " ".join(picked) or "?"}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run(dropout)  # warm-up
                    synchronize(ctx.device)
                    start = time.perf_counter()
                    for _ in range(ctx.steps):
                        run(dropout)
                    synchronize(ctx.device)
                row[f"{backend.name.lower()} ms"] = 1e3 * (time.perf_counter() - start) / ctx.steps
            except RuntimeError as exn:
                row[f"{backend.name.lower()} ms"] = f"n/a ({_error(exn)[:60]})"
        ctx.report.add("attention kernels (forward + backward)", row)


def host_syncs(ctx: Context) -> None:
    """Host synchronisations of one training step: CUDA's sync debug mode (every synchronising CUDA call) and the
    host reads of tensor values by where they are (the step is allowed one: the gradient-norm agreement)."""
    bench, spec = ctx.bench("c16"), ctx.nets["c16"]
    for data in ("cached", "online"):
        batch = bench.inputs(spec.batch, spec.sizes[0], data)
        bench.step(batch)  # warm-up: first-call allocations and lazy initialisation
        synchronize(ctx.device)
        reads = HostReads()
        with warnings.catch_warnings(record=True) as caught, reads:
            warnings.simplefilter("always")
            if ctx.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                bench.step(batch)
            finally:
                if ctx.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        ctx.report.add("host synchronisations per step", {
            "network": spec.name, "data": data,
            "cuda syncs": len(syncs) if ctx.device.type == "cuda" else "n/a (cpu)",
            "sync calls": "; ".join(sorted(set(syncs))) or "-",
            "host reads": "; ".join(f"{n}x {op} in {where}" for (op, where), n in reads.sites.items()) or "none"})


def optimizer_step(ctx: Context) -> None:
    """AdamW's step alone over the 1B prior's parameter shapes: fused (the configs' default), foreach, per tensor."""
    shapes = [p.shape for p in ctx.bench("c1b").trained.parameters()]  # kept built: the loader case uses it
    params = [torch.nn.Parameter(torch.randn(s, device=ctx.device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    for name, options in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("per tensor",
                                                                                       {"foreach": False})):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
        optimizer.step()
        synchronize(ctx.device)
        start = time.perf_counter()
        for _ in range(ctx.steps):
            optimizer.step()
        synchronize(ctx.device)
        ctx.report.add("AdamW step", {"parameters": f"{sum(math.prod(s) for s in shapes) / 1e6:.0f}M in "
                                                    f"{len(shapes)} tensors", "implementation": name,
                                      "step_ms": 1e3 * (time.perf_counter() - start) / ctx.steps})
        del optimizer
    del params


def loader_rate(dataset: Any, workers: int, batches: int) -> float:
    """Samples/s of a loader over ``dataset`` with ``workers`` processes after one warm-up batch per worker."""
    iterator = iter(DataLoader(dataset, batch_size=None, num_workers=workers))
    for _ in range(max(workers, 1)):
        next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        count += len(next(iterator)["captions"])
    return count / (time.perf_counter() - start)


def loader(ctx: Context) -> None:
    """Samples/s per worker: online Stage B batches at its largest size (decode, crop, 0.75x compressor view) and
    cached Stage C batches; then which of loader and step limits the measured step rate."""
    spec_b, spec_c = ctx.nets["b"], ctx.nets["c1b"]
    side = spec_b.sizes[-1]
    shards = ctx.work / f"shards_{side}"
    write_synthetic_shards(shards, 16 if ctx.smoke else 128, side, seed=0, shard_size=8 if ctx.smoke else 32)
    urls = str(shards)
    worker_counts = (1, 2) if ctx.smoke else (1, 4, 8)
    batches = 4 if ctx.smoke else 24
    transform = ImageTransform(side, outputs=("images", "effnet_images"))
    for workers in worker_counts:
        dataset = WebImageTextDataset(urls, batch_size=spec_b.batch, transform=transform, shuffle_buffer=16)
        rate = loader_rate(dataset, workers, batches)
        step = ctx.rates.get(("b", side, "online"))
        ctx.report.add("input side", {"stream": f"online Stage B, {side} px JPEGs", "workers": workers,
                                      "samples_per_s": rate, "per_worker": rate / workers,
                                      "step samples_per_s": step, "bottleneck": _verdict(rate, step)})
    # the cached Stage C stream: arrays written by the real cache writer with the 1B prior's encoders
    bench = ctx.bench("c1b")
    cache, latent = ctx.work / "cache_c", latent_size(side)
    conditioning = StageCConditioning(bench.module.frozen.text_encoder, bench.module.effnet)
    write_cache(conditioning, str(shards), cache, image_size=side, batch_size=8, num_workers=1)
    for workers in worker_counts:
        dataset = CachedDataset(str(cache), batch_size=spec_c.batch, shuffle_buffer=16)
        rate = loader_rate(dataset, workers, batches)
        step = ctx.rates.get(("c1b", latent, "cached"))
        ctx.report.add("input side", {"stream": f"cached Stage C ({latent}x{latent} latents, text states)",
                                      "workers": workers, "samples_per_s": rate,
                                      "per_worker": rate / workers, "step samples_per_s": step,
                                      "bottleneck": _verdict(rate, step)})


def _verdict(loader_rate_: float, step_rate: float | None) -> str:
    if step_rate is None:
        return "step not measured"
    return f"loader ({loader_rate_ / step_rate:.2f}x the step)" if loader_rate_ < step_rate else \
        f"step (loader {loader_rate_ / step_rate:.1f}x ahead)"


# (name, seconds it is expected to take on an H100/H200, the case), in priority order and grouped so that each
# network is built as few times as possible; the attention kernels (cuDNN's among them) after the main rows, since
# a kernel fault would end every case after it
CASES: list[tuple[str, float, Callable[[Context], None]]] = [
    ("c16_24_cached", 20, eager("c16", 0, "cached")),
    ("host_syncs", 10, host_syncs),
    ("c1b_24_cached", 25, eager("c1b", 0, "cached")),
    ("c1b_24_online", 20, eager("c1b", 0, "online")),
    ("c1b_48_cached", 20, eager("c1b", 1, "cached")),
    ("optimizer", 15, optimizer_step),
    ("loader", 60, loader),
    ("b_512_online", 30, eager("b", 0, "online")),
    ("b_1024_online", 30, eager("b", 1, "online")),
    ("b_channels_last", 30, channels_last),
    ("attention", 15, attention),
    ("c16_compiled", 90, compiled("c16")),
    ("c16_fsdp", 20, fsdp("c16")),
    ("c1b_fsdp", 25, fsdp("c1b")),
    ("c16_largest_batch", 60, largest_batch("c16")),
    ("c1b_largest_batch", 60, largest_batch("c1b")),
    ("c1b_compiled", 90, compiled("c1b")),
    ("b_compiled", 120, compiled("b")),
]


def machine(device: torch.device, peak: float | None, args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                            platform.processor() or platform.machine(), "peak bf16 TFLOP/s": peak,
                            "memory budget GB": args.memory_budget_gb, "budget s": args.budget_s}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["memory GB"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        info["cpus"] = os.cpu_count()
    return info


class OverTime(BaseException):
    """Raised by the alarm in the case still running past ``--budget-s + --grace-s``: a BaseException, so that no
    library's ``except Exception`` swallows it."""


def _over_time(signum: int, frame: Any) -> None:
    signal.alarm(10)  # again in 10 s, should something swallow this one after all
    raise OverTime("over the report's time limit (--budget-s + --grace-s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_report"))
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no case that would end after this many seconds")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="stop the case still running this long after the budget")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: detected)")
    parser.add_argument("--memory-budget-gb", type=float, default=None,
                        help="for the largest-batch cases (default: 80, an H100's memory; 1 with --smoke)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in CASES], help="run these cases only")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 6; 1 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="every case at tiny sizes on the CPU")
    args = parser.parse_args(argv)
    if args.memory_budget_gb is None:
        args.memory_budget_gb = 1.0 if args.smoke else 80.0
    return args


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as scripts/train.py
    peak = args.peak_tflops or peak_tflops(device)
    report = Report(args.out, machine(device, peak, args))
    if device.type == "cpu" and not args.smoke:
        report.notes.append("no CUDA device: ran at full size on the CPU (use --smoke for the quick check)")
    torch.manual_seed(0)
    # a case running far past the budget is stopped (recorded as failed), the rest skipped
    signal.signal(signal.SIGALRM, _over_time)
    signal.alarm(max(1, math.ceil(args.budget_s + args.grace_s)))
    with tempfile.TemporaryDirectory() as work:
        ctx = Context(device, torch.bfloat16, peak, args.smoke, args.memory_budget_gb,
                      args.steps or (1 if args.smoke else 6), 1 if args.smoke else 2,
                      "aot_eager" if args.smoke else "inductor", report, networks(args.smoke), Path(work))
        for name, expected, case in CASES:
            if args.only and name not in args.only:
                continue
            left = args.budget_s - (time.perf_counter() - started)
            if left < (expected / 20 if args.smoke else expected):  # the smoke run's cases take seconds
                report.add("cases", {"case": name, "status": f"skipped: {max(left, 0):.0f} s left of the budget, "
                                                             f"{expected:.0f} s expected", "seconds": None})
                continue
            start = time.perf_counter()
            try:
                case(ctx)
                status = "ok"
            except (Exception, OverTime) as exn:  # one case's failure is a row of the report, not the end of it
                status = f"failed: {_error(exn)}"
                traceback.print_exc()
            try:  # outside the handler: its traceback no longer holds the case's tensors
                release(device)
            except Exception as exn:  # a broken CUDA context: record it, the next cases will say so too
                status += f"; cleanup failed: {_error(exn)}"
            report.add("cases", {"case": name, "status": status, "seconds": time.perf_counter() - start})
        signal.alarm(0)
        ctx.free()
    report.notes.append(f"total {time.perf_counter() - started:.0f} s")
    report.write()
    print(report.markdown())
    return report


if __name__ == "__main__":
    main()

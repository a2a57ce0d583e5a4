"""Two CPU processes (gloo) through scripts/train.py: DDP trains Stage B (SyncBatchNorm compressor) and Stage C, a
resumed DDP run matches an uninterrupted one bitwise, and a DDP checkpoint resumes on one process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import JOINT_COMPRESSOR, common, losses_by_step, output, run, to_legacy

from wuerstchen.training.distributed import all_finite, clip_by_norm, step_health
from wuerstchen.weights import load_network

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "data.batches_per_epoch=5", "callbacks.preview=null"]


def stage_c(chain: dict[str, Path]) -> list[str]:
    return ["experiment=demo_stage_c", "data.batch_size=8", "stage.ema.start_step=2",
            f"stage_b_ckpt={chain['b'] / 'checkpoints' / 'last.ckpt'}"]


def test_ddp_resume_matches_an_uninterrupted_ddp_run(shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run("train.py", *common(shards, full, 8, every=4), *stage_c(chain), *DDP)
    run("train.py", *common(shards, resumed, 4, every=4), *stage_c(chain), *DDP)
    second = run("train.py", *common(shards, resumed, 8, every=4), *stage_c(chain), *DDP)
    assert "resuming from" in output(second)
    assert losses_by_step(resumed) == losses_by_step(full) and len(losses_by_step(full)) == 8
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(a["rng_states"]) == 2  # one per rank
    assert a["ema_of"] == "stage_c" and any(k.startswith("ema_network.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():  # the EMA copy included
        assert torch.equal(value, b["state_dict"][key]), key

    # the same run continues on one process (RNG streams restart: different rank count)
    single = run("train.py", *common(shards, resumed, 10, every=4), *stage_c(chain), "data.batches_per_epoch=5",
                 "callbacks.preview=null")
    assert "RNG states of 2 ranks" in output(single)
    assert sorted(losses_by_step(resumed)) == list(range(10))


def test_ddp_stage_b_syncs_the_compressor_batchnorm(shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "b"
    result = run("train.py", *common(shards, run_dir, 4, every=4), "experiment=demo_stage_b", "data.batch_size=8",
                 f"stage_a_ckpt={chain['a'] / 'checkpoints' / 'last.ckpt'}", *DDP,
                 f"effnet_init={chain['effnet'] / 'checkpoints' / 'last.ckpt'}", *JOINT_COMPRESSOR)
    assert re.search(r"compressor BatchNorm layers: [1-9]\d* SyncBatchNorm, 0 per-rank, world size 2", output(result))
    losses = losses_by_step(run_dir)
    assert len(losses) == 4 and all(float(v) == float(v) for v in losses.values())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("effnet.") and k.endswith("running_mean") for k in state)


def _sync_bn_rank(rank: int, world: int, port: int, x: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from wuerstchen.training.distributed import SyncBatchNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = SyncBatchNorm(3, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(part)
    (y * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
    torch.save({"y": y.detach(), "x_grad": part.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sync_batchnorm_over_two_gloo_ranks_equals_one_batchnorm_over_the_whole_batch(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    x = torch.randn(6, 3, 5, 4) * 3 + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_bn_rank, args=(2, port, x, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    bn = torch.nn.BatchNorm2d(3, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    whole = x.clone().requires_grad_(True)
    y = bn(whole)
    # each rank's loss weights its own slice: the same per-element weights as one loss over the whole batch
    weights = torch.cat([torch.arange(y.numel() // 2).reshape(3, 3, 5, 4).float().sin()] * 2)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), whole.grad, atol=1e-5, rtol=1e-5)
    for r in ranks:  # parameter gradients: each rank holds its share, DDP sums them
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)
    torch.testing.assert_close(ranks[0]["w_grad"] + ranks[1]["w_grad"], bn.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["b_grad"] + ranks[1]["b_grad"], bn.bias.grad, atol=1e-4, rtol=1e-5)


def _spawn_two_gloo_ranks(fn, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` on two CPU processes joined by gloo."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(2, port, *args), nprocs=2)


def _sync_bn_bf16_rank(rank: int, world: int, port: int, x: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from wuerstchen.training.distributed import SyncBatchNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    bn = SyncBatchNorm(x.shape[1], momentum=1.0)  # the running statistics become this batch's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x.chunk(world)[rank])
    torch.save({"y": y, "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sync_batchnorm_statistics_of_bf16_inputs_match_float64(tmp_path: Path) -> None:
    """bf16 activations with a mean far above their spread: bf16 sums of x and x^2 would cancel to noise."""
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([40.0, -100.0, 300.0]), torch.tensor([0.5, 1.0, 2.0])
    x = (mean[None, :, None, None] + std[None, :, None, None] * torch.randn(8, 3, 16, 16, generator=gen)).bfloat16()
    _spawn_two_gloo_ranks(_sync_bn_bf16_rank, x, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    ref = x.double()  # the same bf16 values, statistics over the whole batch in float64
    ref_mean, ref_var = ref.mean((0, 2, 3)), ref.var((0, 2, 3), correction=1)
    ref_y = (ref - ref_mean[None, :, None, None]) / torch.sqrt(ref.var((0, 2, 3), correction=0) + 1e-5)[
        None, :, None, None]
    for r in ranks:
        torch.testing.assert_close(r["running_mean"].double(), ref_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["running_var"].double(), ref_var, rtol=1e-5, atol=0)
    y = torch.cat([r["y"] for r in ranks])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=0.02)  # bf16 rounding of values within a few std


def test_convert_sync_batchnorm_follows_the_training_device_not_the_parameters() -> None:
    from timm.layers import BatchNormAct2d

    from wuerstchen.training.distributed import SyncBatchNorm, convert_sync_batchnorm

    def net() -> torch.nn.Module:  # on the CPU, as when configure_model runs, before the strategy moves it
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), BatchNormAct2d(4))

    on_cuda = convert_sync_batchnorm(net(), torch.device("cuda", 1))
    assert all(isinstance(on_cuda[i], torch.nn.SyncBatchNorm) for i in (1, 2))
    assert isinstance(on_cuda[2].act, torch.nn.ReLU)  # timm's converter keeps the activation
    on_cpu = convert_sync_batchnorm(net(), "cpu")
    assert all(type(on_cpu[i]) is SyncBatchNorm for i in (1, 2)) and isinstance(on_cpu[2].post[-1], torch.nn.ReLU)


def test_nonfinite_gradients_skip_the_step_on_both_ranks_then_stop_the_run(shards: Path, chain: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    # an absurd LR sends the weights to inf after the first step; every later step has NaN gradients
    result = run("train.py", *common(shards, tmp_path / "c", 20, every=100), *stage_c(chain), *DDP,
                 "stage.optimizer.lr=1e30", "stage.scheduler.warmup_steps=0", "stage.max_nonfinite_steps=3",
                 check=False, timeout=300)
    assert result.returncode != 0
    text = output(result)
    assert "3 optimizer steps in a row had non-finite gradients" in text and "stage.max_nonfinite_steps=3" in text
    assert text.count("optimizer step skipped on all ranks (1 in a row") == 2  # both ranks skipped the same step


def test_a_skipped_step_changes_no_weight() -> None:
    from wuerstchen.training.distributed import NonFiniteSteps

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    guard = NonFiniteSteps(max_in_a_row=2)
    assert not guard.check(optimizer, step=0, device=torch.device("cpu"))
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not optimizer.state
    model(torch.ones(1, 3)).sum().backward()
    assert guard.check(optimizer, step=1, device=torch.device("cpu")) and guard.in_a_row == 0 and guard.total == 1
    bad = torch.tensor([[float("inf"), 0.0, 0.0]])
    optimizer.zero_grad()
    model(bad).sum().backward()
    assert not guard.check(optimizer, step=2, device=torch.device("cpu")) and guard.in_a_row == 1
    model(bad).sum().backward()
    with pytest.raises(FloatingPointError, match="2 optimizer steps in a row"):
        guard.check(optimizer, step=3, device=torch.device("cpu"))


FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "trainer.strategy.param_dtype=null", "data.batches_per_epoch=5"]


def test_fsdp_trains_resumes_bitwise_matches_ddp_and_consolidates(shards: Path, chain: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    full, resumed, ddp = tmp_path / "full", tmp_path / "resumed", tmp_path / "ddp"
    run("train.py", *common(shards, full, 8, every=4), *stage_c(chain), *FSDP)
    first = run("train.py", *common(shards, resumed, 4, every=4), *stage_c(chain), *FSDP)
    assert "FSDP: StageC (trained) sharded over 2 ranks" in output(first)
    sharded = resumed / "checkpoints" / "step=0000004.ckpt"
    assert sharded.is_dir() and (sharded / ".metadata").is_file()  # one folder of per-rank shards
    run("train.py", *common(shards, resumed, 8, every=4), *stage_c(chain), *FSDP)
    assert losses_by_step(resumed) == losses_by_step(full) and len(losses_by_step(full)) == 8

    # the same data, noise and steps under DDP: the same model up to float reduction order
    run("train.py", *common(shards, ddp, 8, every=4), *stage_c(chain), *DDP)
    reference = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)
    # a DDP run's single file, in the older layout (EMA outside state_dict), continues under FSDP
    torch.save(to_legacy(torch.load(ddp / "checkpoints" / "step=0000004.ckpt", weights_only=True)),
               tmp_path / "ddp_legacy.ckpt")
    moved = tmp_path / "moved"
    run("train.py", *common(shards, moved, 8, every=4), *stage_c(chain), *FSDP,
        f"ckpt_path={tmp_path / 'ddp_legacy.ckpt'}")
    assert sorted(losses_by_step(moved)) == [4, 5, 6, 7]
    for step, loss in losses_by_step(moved).items():
        assert float(loss) == pytest.approx(float(losses_by_step(ddp)[step]), rel=1e-4), step
    run("consolidate_checkpoint.py", str(moved / "checkpoints" / "step=0000008.ckpt"), str(tmp_path / "moved.ckpt"))
    moved_state = torch.load(tmp_path / "moved.ckpt", weights_only=True)["state_dict"]
    for key, value in reference["state_dict"].items():  # the EMA and the optimizer's moments came along
        torch.testing.assert_close(moved_state[key], value, rtol=1e-4, atol=1e-6, msg=key)

    last = full / "checkpoints" / "step=0000008.ckpt"
    consolidated = tmp_path / "stage_c.ckpt"
    run("consolidate_checkpoint.py", str(last), str(consolidated))
    mine = torch.load(consolidated, weights_only=True)
    assert mine["ema_of"] == reference["ema_of"] == "stage_c" and mine["global_step"] == 8
    assert mine["state_dict"].keys() == reference["state_dict"].keys()  # one layout, the EMA copy included
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(mine["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    # the folder loads like any checkpoint (EMA weights by default)
    network, _ = load_network("c", last)
    assert all(torch.equal(v, mine["state_dict"][f"ema_network.{k}"]) for k, v in network.state_dict().items())

    # a sharded checkpoint resumes on another process count (torch distributed checkpoint reshards)
    single = run("train.py", *common(shards, full, 10, every=5), *stage_c(chain), *FSDP, "trainer.devices=1")
    assert "resuming from" in output(single) and sorted(losses_by_step(full)) == list(range(10))


def test_fsdp_stage_b_with_activation_checkpointing_sync_batchnorm_and_previews(shards: Path, chain: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "b"
    result = run("train.py", *common(shards, run_dir, 4, every=4), "experiment=demo_stage_b", "data.batch_size=8",
                 f"stage_a_ckpt={chain['a'] / 'checkpoints' / 'last.ckpt'}",
                 f"effnet_init={chain['effnet'] / 'checkpoints' / 'last.ckpt'}", *FSDP, *JOINT_COMPRESSOR,
                 "callbacks.preview.every_n_steps=2",
                 "trainer.strategy.activation_checkpointing=true", "stage.ema={decay: 0.9}")
    text = output(result)
    assert "FSDP: StageB (trained) sharded over 2 ranks" in text and "activation checkpointing" in text
    assert re.search(r"FSDP: SemanticCompressor \(trained\) sharded over 2 ranks in [1-9]\d* units", text)
    assert re.search(r"compressor BatchNorm layers: [1-9]\d* SyncBatchNorm, 0 per-rank, world size 2", text)
    assert "FSDP: StageA" not in text  # frozen: replicated
    # previews render on every rank from the sharded raw and EMA networks
    assert (run_dir / "previews" / "step_0000004_sample.png").exists()
    assert (run_dir / "previews" / "step_0000004_sample_ema.png").exists()
    stage_b, _ = load_network("b", run_dir / "checkpoints" / "last.ckpt")
    assert stage_b.config["c_hidden"] == [32, 64, 128]


def _units_cases() -> list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]]:
    """Tiny Stage B and C with random weights (zero-initialised layers would hide wiring errors) and a batch of 4."""
    from wuerstchen.models import StageB, StageC

    gen = torch.Generator().manual_seed(0)
    stage_c = StageC(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=4, dropout=0.0)
    stage_b = StageB(c_hidden=[16, 32], nhead=[-1, 4], blocks=[1, 2], level_config=["CT", "CTA"],
                     inject_effnet=[False, True], effnet_embd=16, clip_embd=20, c_cond=24, c_r=8, dropout=0.0)
    for model in (stage_c, stage_b):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    c_inputs = (torch.randn(4, 16, 4, 6, generator=gen), torch.rand(4, generator=gen),
                torch.randn(4, 77, 24, generator=gen))
    b_inputs = (torch.randn(4, 4, 8, 8, generator=gen), torch.rand(4, generator=gen),
                torch.randn(4, 16, 3, 3, generator=gen), torch.randn(4, 77, 20, generator=gen))
    return [("c", stage_c.train(), c_inputs), ("b", stage_b.train(), b_inputs)]


def _frozen_stage_a() -> tuple[torch.nn.Module, torch.Tensor]:
    from wuerstchen.models import StageA

    gen = torch.Generator().manual_seed(1)
    stage_a = StageA(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=8).eval()
    with torch.no_grad():
        for p in stage_a.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return stage_a.requires_grad_(False), torch.rand(4, 3, 16, 16, generator=gen)


def _parallelize_rank(rank: int, world: int, port: int, out: str) -> None:
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from wuerstchen.training.distributed import parallelize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, model, inputs in _units_cases():
        average = copy.deepcopy(model).eval()
        units = parallelize(model, mesh, activation_checkpointing=True)
        mine = [x.chunk(world)[rank] for x in inputs]
        loss = model(*mine).square().mean()
        loss.backward()
        # a forward without a backward (validation, the EMA copy) leaves every parameter sharded, whatever
        # reshard_after_forward says (the root never reshards after its forward otherwise)
        parallelize(average, mesh, reshard_after_forward=False)
        with torch.no_grad():
            average(*mine)
            model.eval()(*mine)
        sharded = all(isinstance(p, DTensor) for net in (model, average) for p in net.parameters())
        results[name] = {"loss": loss.detach(), "units": len(units), "keys": list(model.state_dict()),
                         "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
                         "sharded_after_no_grad": sharded}
    # a sharded frozen Stage A (shard_frozen): its encode, quantize and decode run as forwards of the root
    stage_a, images = _frozen_stage_a()
    parallelize(stage_a, mesh)
    with torch.no_grad():
        latents = stage_a.encode(images.chunk(world)[rank])
        results["a"] = {"latents": latents, "decoded": stage_a.decode(stage_a.quantize(latents).latents),
                        "sharded_after_no_grad": all(isinstance(p, DTensor) for p in stage_a.parameters())}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_parallelize_shards_every_unit_and_checkpoints_them_with_the_gradients_of_one_process(tmp_path: Path) -> None:
    """FSDP over two gloo ranks of tiny Stage B and C, activation checkpointing on: the same losses and (averaged)
    gradients as one process computing both ranks' halves, and the released state-dict keys; a sharded frozen Stage A
    encodes and decodes as the unsharded one does."""
    _spawn_two_gloo_ranks(_parallelize_rank, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, model, inputs in _units_cases():
        losses = [model(*[x.chunk(2)[r] for x in inputs]).square().mean() for r in range(2)]
        (sum(losses) / 2).backward()  # FSDP averages the ranks' gradients
        for r, rank in enumerate(ranks):
            mine = rank[name]
            assert mine["units"] == len(model.fsdp_units()) and mine["sharded_after_no_grad"]
            assert mine["keys"] == list(model.state_dict())
            torch.testing.assert_close(mine["loss"], losses[r].detach(), rtol=1e-6, atol=1e-7)
            for key, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().max() > 0, key
                torch.testing.assert_close(mine["grads"][key], p.grad, rtol=1e-5, atol=1e-7, msg=key)
    stage_a, images = _frozen_stage_a()
    with torch.no_grad():
        for r, rank in enumerate(ranks):
            latents = stage_a.encode(images.chunk(2)[r])
            torch.testing.assert_close(rank["a"]["latents"], latents, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rank["a"]["decoded"], stage_a.decode(stage_a.quantize(latents).latents),
                                       rtol=1e-5, atol=1e-6)
            assert rank["a"]["sharded_after_no_grad"]


def test_stage_a_refuses_fsdp_naming_the_strategy_that_trains_it(shards: Path, tmp_path: Path) -> None:
    result = run("train.py", *common(shards, tmp_path, 2), "experiment=demo_stage_a", *FSDP, "trainer.devices=1",
                 check=False)
    assert result.returncode != 0 and "Stage A (18M parameters, on every GPU) trains with trainer=ddp" in output(result)


def test_all_finite_spots_any_nan_or_inf_in_one_multi_tensor_pass() -> None:
    grads = [torch.randn(4, 4), torch.empty(0), torch.randn(3).to(torch.bfloat16), None]
    assert all_finite(grads, torch.device("cpu"))
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = [g.clone() if g is not None else None for g in grads]
        broken[2][1] = bad
        assert not all_finite(broken, torch.device("cpu")), bad


def _step_health_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    whole = [torch.arange(12.0).view(4, 3) - 5, torch.linspace(-2, 3, 6)]
    sharded = [distribute_tensor(g.clone(), mesh, [Shard(0)]) for g in whole]  # each rank holds half the rows
    cpu = torch.device("cpu")
    results = {"sharded": step_health(sharded, cpu, flags=[rank == 1, False]),
               "replicated": step_health([g.clone() for g in whole], cpu, flags=[False]),
               "nan_on_rank_1": step_health([torch.full((2,), float("nan") if rank else 1.0)], cpu)}
    clip_by_norm(sharded, 1.0, results["sharded"].norm)
    torch.save({"health": {k: (v.norm, v.finite, v.flags) for k, v in results.items()},
                "clipped": [g.full_tensor() for g in sharded]}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_step_health_agrees_on_norm_finiteness_and_flags_over_two_gloo_ranks(tmp_path: Path) -> None:
    """One all-reduce carries the sharded gradients' squared norm, the non-finite count and the flags: every rank
    gets the global norm of the whole gradients, a NaN on one rank stops both, a flag set on one rank is set on both;
    clipping with that norm equals clip_grad_norm_ on the whole gradients."""
    _spawn_two_gloo_ranks(_step_health_rank, str(tmp_path))
    whole = [torch.arange(12.0).view(4, 3) - 5, torch.linspace(-2, 3, 6)]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in whole]))
    reference = [g.clone() for g in whole]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for p, g in zip(params, reference):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"{rank}.pt")
        health = saved["health"]
        for key in ("sharded", "replicated"):
            torch.testing.assert_close(health[key][0], expected)
            assert health[key][1]
        assert health["sharded"][2] == [True, False] and health["replicated"][2] == [False]
        assert health["nan_on_rank_1"][1] is False  # rank 0's own gradient is finite: it stops with rank 1
        for clipped, p in zip(saved["clipped"], params):
            torch.testing.assert_close(clipped, p.grad)


def test_clip_by_norm_is_clip_grad_norm_bit_for_bit() -> None:
    """The training step clips with the norm it agreed on; the result is clip_grad_norm_'s to the last bit."""
    torch.manual_seed(0)
    grads = [torch.randn(7, 5) * 3, torch.randn(11), torch.randn(2, 3, 4)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    health = step_health(grads, torch.device("cpu"))
    clip_by_norm(grads, 0.5, health.norm)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))

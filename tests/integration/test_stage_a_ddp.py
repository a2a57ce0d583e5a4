"""Stage A under two CPU DDP processes (gloo) through scripts/train.py: dead-code restarts count every rank's code
uses and leave the ranks with one codebook."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Any

import lightning as L
import torch
from helpers import ROOT, SIZE, common, run

from wuerstchen.training.stage_a import StageAModule

BATCH, RESTART_EVERY, STEPS, CODES = 8, 2, 5, 64  # BATCH is global: 4 images a rank
POSITIONS = BATCH * (SIZE // 4) ** 2  # latent positions quantised per step, over both ranks


class RankRecord(L.Callback):
    """Writes ``out/rank{r}.pt``: per training step, this rank's own code histogram and the codebook it quantised
    with (seen by a forward hook on the quantiser, after any restart), and ``code_uses`` and the codebook after the
    step."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: StageAModule) -> None:
        pl_module.stage_a.vquantizer.register_forward_hook(self._record_quantised)

    def _record_quantised(self, quantizer: torch.nn.Module, inputs: Any, output: Any) -> None:
        if quantizer.training:  # validation quantises too
            self.steps.append({"local_uses": torch.bincount(output.indices.flatten(), minlength=CODES),
                               "codebook_used": quantizer.codebook.weight.detach().clone()})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: StageAModule, *args: Any) -> None:
        self.steps[-1].update(code_uses=pl_module.code_uses.clone(),
                              codebook_after=pl_module.stage_a.vquantizer.codebook.weight.detach().clone())

    def on_train_end(self, trainer: L.Trainer, pl_module: StageAModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.steps, self.out / f"rank{trainer.global_rank}.pt")


def test_ddp_codebook_restarts_sum_uses_over_ranks_and_keep_one_codebook(shards: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    # the training processes import RankRecord from here (and this module's helpers)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "integration"), str(ROOT / "tests")]))
    overrides = [o for o in common(shards, tmp_path / "run", STEPS, every=STEPS) if "num_workers" not in o]
    run("train.py", *overrides, "experiment=demo_stage_a", "stage.stage_a.c_hidden=16", "stage.latent_scale_images=32",
        f"stage.stage_a.codebook_size={CODES}", f"stage.codebook_restart_every={RESTART_EVERY}",
        f"data.batch_size={BATCH}", "data.num_workers=2", "data.batches_per_epoch=5", "callbacks.preview=null",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        # the discriminator starts inside the run (the experiment's ddp_find_unused_parameters lets DDP accept the
        # discriminator's parameters getting no gradient in the generator's backward)
        "stage.disc_start=3",
        "+callbacks.record._target_=test_stage_a_ddp.RankRecord", f"+callbacks.record.out={tmp_path / 'ranks'}")
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == STEPS
    restarted = 0
    for step in range(STEPS):
        r0, r1 = ranks[0][step], ranks[1][step]
        # one codebook on both ranks, before and after the optimizer step
        assert torch.equal(r0["codebook_used"], r1["codebook_used"]), step
        assert torch.equal(r0["codebook_after"], r1["codebook_after"]), step
        # both ranks hold the uses of both ranks' batches since the last restart (the data differs per rank)
        assert not torch.equal(r0["local_uses"], r1["local_uses"])
        since = r0["local_uses"] + r1["local_uses"]
        if step % RESTART_EVERY:
            since = since + ranks[0][step - 1]["code_uses"]
        assert torch.equal(r0["code_uses"], since) and torch.equal(r1["code_uses"], since), step
        assert int(r0["code_uses"].sum()) == POSITIONS * (1 + step % RESTART_EVERY)
        if step and step % RESTART_EVERY == 0:
            # exactly the codes no rank used since the last restart moved; the others are as the last step left them
            dead = ranks[0][step - 1]["code_uses"] == 0
            moved = (r0["codebook_used"] != ranks[0][step - 1]["codebook_after"]).any(dim=1)
            assert torch.equal(moved, dead), step
            restarted += int(dead.sum())
    assert restarted > 0  # the restarts had dead codes to move
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["code_uses"], ranks[1][-1]["code_uses"])  # rank 0 saves; rank 1 holds the same
    assert torch.equal(saved["stage_a.vquantizer.codebook.weight"], ranks[1][-1]["codebook_after"])

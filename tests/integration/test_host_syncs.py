"""Host synchronisations on the training step: every read of a tensor's value by the host between a batch's start
and end (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``.cpu()``, ...) is counted where it happens. On a GPU
each is a stall of the host until the device catches up; the step is allowed one, the agreement before the optimizer
step (:func:`wuerstchen.training.distributed.step_health`: gradient norm, non-finite check, preemption flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from helpers import common, train_here

from wuerstchen.benchmarking import HostReads

READS = HostReads()
READS.counting = False  # on for each training batch


class CountHostReads(L.Callback):
    """Switches the count on for each training batch (after its transfer to the device)."""

    def on_train_batch_start(self, *args: Any) -> None:
        READS.counting = True

    def on_train_batch_end(self, *args: Any) -> None:
        READS.counting = False


def test_a_training_step_reads_one_value_on_the_host(shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    steps = 12
    READS.sites.clear()
    with READS:
        train_here("experiment=demo_stage_c", *common(shards, tmp_path, steps, every=1000), "data.batch_size=8",
                   f"stage_b_ckpt={chain['b'] / 'checkpoints' / 'last.ckpt'}", "trainer.log_every_n_steps=1000",
                   "callbacks.throughput.count_flops=false", "callbacks.preview=null", "data.num_workers=2",
                   f"+callbacks.host_reads._target_={__name__}.CountHostReads")
    assert dict(READS.sites) == {("item", "distributed.py:step_health"): steps}

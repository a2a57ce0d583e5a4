"""Run a script with SIGUSR1 sent once, from inside the run, at an awkward moment:

    python tests/signal_at.py scripts/train.py OVERRIDES...   (environment: SIGNAL_AT, SIGNAL_HOW, SIGNAL_SAVE_STEP)

``SIGNAL_AT``: ``validation`` (the first validation step), ``save`` (inside the first checkpoint save at step
``SIGNAL_SAVE_STEP`` or later), ``setup`` (when the training loader is made, before the first step) or empty (none).
``SIGNAL_HOW``: ``killpg`` sends it to this process group (the training process and its loader workers), ``scancel``
asks Slurm to signal every process of the job's steps, as ``--signal=USR1@N`` does; only in a job's first attempt.
"""

import os
import runpy
import signal
import subprocess
import sys
import time

WHERE = os.environ.get("SIGNAL_AT", "")
HOW = os.environ.get("SIGNAL_HOW", "killpg")


def send_once() -> None:
    if os.environ.get("SIGNAL_SENT") or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return
    os.environ["SIGNAL_SENT"] = "1"
    if HOW == "scancel":  # scancel runs inside the job step too: it must not die of the signal it asks for
        subprocess.run(["scancel", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=True,
                       preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        time.sleep(3)  # Slurm delivers it while this phase still runs
    else:
        os.killpg(os.getpgrp(), signal.SIGUSR1)
        time.sleep(0.5)


def before(cls: type, name: str, when=lambda *args: True) -> None:
    original = getattr(cls, name)

    def wrapped(*args, **kwargs):
        if when(*args):
            send_once()
        return original(*args, **kwargs)

    setattr(cls, name, wrapped)


if WHERE == "validation":
    from wuerstchen.training.stage_a import StageAModule

    before(StageAModule, "validation_step")
elif WHERE == "save":
    import lightning.fabric.plugins.io.torch_io as torch_io

    step = int(os.environ.get("SIGNAL_SAVE_STEP", "1"))
    original_save = torch_io._atomic_save

    def save(checkpoint, filepath):
        if checkpoint["global_step"] >= step:
            send_once()
        original_save(checkpoint, filepath)

    torch_io._atomic_save = save
elif WHERE == "setup":
    from wuerstchen.data.datamodule import WebDataModule

    before(WebDataModule, "train_dataloader")

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")

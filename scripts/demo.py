"""The CPU demo: synthetic shards -> tiny compressor pretraining, Stage A, B, C -> samples for held-out captions ->
scores.

    python scripts/demo.py [--out runs/demo] [--data data/synthetic] [--fresh]
    python scripts/demo.py --finetune 128    # then: Stage C fine-tuned at a doubled resolution, scored before/after

Each stage trains with its ``demo_*`` experiment through ``wuerstchen.train.train``, what ``python scripts/train.py
experiment=demo_...`` runs; ``--out`` and ``--data`` default to where those experiments keep their runs and read their
shards (``${paths.runs_dir}/demo``, ``${paths.data_dir}/synthetic``). Stage B and C read caches of their frozen
networks' outputs (``scripts/cache_latents.py``, ``data=synthetic_cached``). Re-running resumes: a finished stage is
not trained again, an interrupted one continues from its newest checkpoint (``--fresh`` starts all of them over).
Writes ``summary.json`` (Stage A PSNR on held-out images, caption colour/shape/position accuracy of generated images,
timings) and ``samples.png`` (a captioned grid); the measures are in ``wuerstchen/evaluation.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports the hub client: the demo needs no download

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from wuerstchen.data.synthetic import write_synthetic_shards  # noqa: E402
from wuerstchen.evaluation import (  # noqa: E402
    caption_accuracy, captioned_grid, generate, held_out, prior_probe, stage_a_psnr,
)
from wuerstchen.pipeline import Pipeline  # noqa: E402
from wuerstchen.train import compose, train  # noqa: E402
from wuerstchen.weights import checkpoint_info  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
# (run name, experiment): the compressor's contrastive pretraining stands in for its ImageNet weights
STAGES = (("effnet", "demo_effnet"), ("stage_a", "demo_stage_a"), ("stage_b", "demo_stage_b"),
          ("stage_c", "demo_stage_c"))
# Stage B and C train from caches of their frozen networks' outputs (scripts/cache_latents.py), written just before
CACHED = {"stage_b": "b", "stage_c": "c"}


def make_data(data: Path, size: int) -> None:
    """4000 training and 256 held-out samples; the same scenes at any ``size`` (content depends on seed and index)."""
    if not (data / "train" / "00007.tar").exists():
        write_synthetic_shards(data / "train", 4000, size, seed=0, shard_size=500)
    if not (data / "val" / "00000.tar").exists():
        write_synthetic_shards(data / "val", 256, size, seed=1, shard_size=256)


def ckpt(out: Path, name: str) -> Path:
    return out / name / "checkpoints" / "last.ckpt"


def run_stage(*overrides: str) -> None:
    """``python scripts/train.py overrides...`` in this process; a run a signal stopped ends the demo with the
    script's exit status (re-running the demo continues it)."""
    status = train(compose(overrides)).exit_status
    if status:
        sys.exit(status)


def cache(out: Path, data: Path, stage: str) -> Path:
    """Stage ``stage``'s frozen inputs for the training and held-out shards, written once (re-runs skip done shards):
    Stage B's are the Stage A latents, the frozen compressor's latents and the token states; Stage C's the compressor
    latents and the token states."""
    folder = out / f"cache_{stage}"
    networks = [f"stage_b_ckpt={ckpt(out, 'stage_b')}"]
    if stage == "b":  # demo_stage_b keeps the pretrained compressor frozen: its latents are cached too
        networks = [f"stage_a_ckpt={ckpt(out, 'stage_a')}", f"effnet_ckpt={ckpt(out, 'effnet')}"]
    subprocess.run([sys.executable, str(SCRIPTS / "cache_latents.py"), f"for_stage={stage}", "data=synthetic",
                    f"data.urls={data / 'train'}", f"data.val_urls={data / 'val'}", *networks,
                    f"out={folder / 'train'}", f"val_out={folder / 'val'}", "model/text_encoder@text_encoder=tiny",
                    "batch_size=64", "num_workers=1"], check=True, cwd=SCRIPTS.parent)
    return folder


def train_stages(out: Path, data: Path, fresh: bool) -> dict[str, float]:
    timings = {}
    for name, experiment in STAGES:
        run_dir = out / name
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
            if name in CACHED:
                shutil.rmtree(out / f"cache_{CACHED[name]}", ignore_errors=True)
        source = [f"data.urls={data / 'train'}", f"data.val_urls={data / 'val'}"]
        if name in CACHED:
            print(f"== caching the frozen inputs of {name}", flush=True)
            start = time.perf_counter()
            folder = cache(out, data, CACHED[name])
            timings[f"cache_{name}_s"] = round(time.perf_counter() - start, 1)
            source = ["data=synthetic_cached", f"data.urls={folder / 'train'}", f"data.val_urls={folder / 'val'}"]
        print(f"== training {name} ({experiment}; resumes or skips what an earlier run finished)", flush=True)
        overrides = [f"experiment={experiment}", f"run_dir={run_dir}", *source, f"stage_a_ckpt={ckpt(out, 'stage_a')}",
                     f"stage_b_ckpt={ckpt(out, 'stage_b')}"]
        if name == "stage_b":
            overrides.append(f"effnet_init={ckpt(out, 'effnet')}")
        start = time.perf_counter()
        run_stage(*overrides)
        timings[f"train_{name}_s"] = round(time.perf_counter() - start, 1)
    return timings


def sample(out: Path, prompts: list[dict], size: int, stage_c: str = "stage_c"):
    """Images for the prompts' captions from the Stage C run ``stage_c`` through the demo's Stage B and A."""
    pipeline = Pipeline.from_checkpoints(ckpt(out, stage_c), ckpt(out, "stage_b"))
    return generate(pipeline, [p["caption"] for p in prompts], size)


def finetune(out: Path, data: Path, size: int, num_images: int) -> None:
    """Fine-tune the demo's Stage C at output side ``size`` (experiment=demo_stage_c_finetune) and score samples at that
    size from the prior before and after, through the same Stage B and A."""
    data_new = data.parent / f"{data.name}_{size}"
    make_data(data_new, size)
    name = f"stage_c_finetune_{size}"
    print(f"== fine-tuning stage_c at {size} px ({name}; resumes or skips what an earlier run finished)", flush=True)
    start = time.perf_counter()
    run_stage("experiment=demo_stage_c_finetune", f"resolution={size}", f"run_dir={out / name}",
              f"data.urls={data_new / 'train'}", f"data.val_urls={data_new / 'val'}",
              f"init_from={ckpt(out, 'stage_c')}", f"stage_b_ckpt={ckpt(out, 'stage_b')}")
    summary: dict = {"size": size, f"train_{name}_s": round(time.perf_counter() - start, 1)}
    prompts = held_out(data_new / "val", size, num_images)
    for label, stage_c in (("before", "stage_c"), ("after", name)):
        images = sample(out, prompts, size, stage_c)
        summary[label] = caption_accuracy(images, prompts)
        captioned_grid(images[:32], [p["caption"] for p in prompts[:32]], out / f"samples_{size}_{label}.png")
    # the decoder never trained at this size; the probes measure the prior alone
    scale = checkpoint_info(ckpt(out, "stage_c"))["effnet_scale"]
    priors = {"before": ckpt(out, "stage_c"), "after": ckpt(out, name)}
    summary["prior_probe"] = prior_probe(ckpt(out, "stage_b"), priors, data_new, size, scale, prompts)
    (out / f"summary_{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + json.dumps(summary, indent=2))


def main() -> None:
    defaults = compose(["experiment=demo_stage_a"])  # where the demo experiments keep their runs and read their data
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(defaults.run_dir).parent, help="runs (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path(defaults.data.urls).parent,
                        help="shards (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=128, help="generated images scored (>= 100)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo runs and train all stages anew")
    parser.add_argument("--finetune", type=int, metavar="SIZE", default=None,
                        help="after the demo, fine-tune its Stage C at this output side and score before/after")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    out, data = args.out.resolve(), args.data.resolve()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    make_data(data, args.size)
    summary: dict = train_stages(out, data, args.fresh)
    samples = held_out(data / "val", args.size, 256)
    summary.update(stage_a_psnr(ckpt(out, "stage_a"), samples))
    prompts = samples[: args.num_images]
    sample_start = time.perf_counter()
    images = sample(out, prompts, args.size)
    summary["sampling_s"] = round(time.perf_counter() - sample_start, 1)
    summary.update(caption_accuracy(images, prompts))
    summary["num_generated"] = len(images)
    summary["total_s"] = round(time.perf_counter() - start, 1)
    captioned_grid(images[:32], [p["caption"] for p in prompts[:32]], out / "samples.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "\n".join(f"{key:34s} {value}" for key, value in summary.items()))
    print(f"\nsamples: {out / 'samples.png'}   summary: {out / 'summary.json'}")
    if args.finetune:
        finetune(out, data, args.finetune, args.num_images)


if __name__ == "__main__":
    main()

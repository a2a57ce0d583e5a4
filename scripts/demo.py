"""The CPU demo: synthetic shards -> tiny compressor pretraining, Stage A, B, C -> samples for held-out captions ->
scores.

    python scripts/demo.py [--out outputs/demo] [--data data/synthetic] [--fresh]
    python scripts/demo.py --finetune 128    # then: Stage C fine-tuned at a doubled resolution, scored before/after

Each stage trains through ``scripts/train.py`` with its ``demo_stage_*`` experiment, exactly as a user would run it;
Stage B and C read caches of their frozen networks' outputs (``scripts/cache_latents.py``, ``data=synthetic_cached``).
Re-running resumes: a finished stage is not trained again, an interrupted one continues from its newest checkpoint
(``--fresh`` starts all three over). Writes ``summary.json`` (Stage A PSNR on held-out
images, caption colour/shape/position accuracy of generated images, timings) and ``samples.png`` (a captioned grid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from sample import load_pipeline, text_encoder  # noqa: E402

from wuerstchen.data import ImageTransform, WebImageTextDataset, to_model_inputs  # noqa: E402
from wuerstchen.data.synthetic import COLOURS, POSITIONS, score_batch, write_synthetic_shards  # noqa: E402
from wuerstchen.pipeline import sample_prior  # noqa: E402
from wuerstchen.weights import checkpoint_info, load_network  # noqa: E402

# (run name, experiment): the compressor's contrastive pretraining stands in for its ImageNet weights
STAGES = (("effnet", "demo_effnet"), ("stage_a", "demo_stage_a"), ("stage_b", "demo_stage_b"),
          ("stage_c", "demo_stage_c"))
# Stage B and C train from caches of their frozen networks' outputs (scripts/cache_latents.py), written just before
CACHED = {"stage_b": "b", "stage_c": "c"}
# Stage B guidance over its semantic latent (zeroed for the unconditional branch); the released recipe has it off,
# the tiny demo decoder reconstructs colour from real latents at 0.77 without and 0.87 with 1.5
DECODER_CFG = 1.5


def make_data(data: Path, size: int) -> None:
    """4000 training and 256 held-out samples; the same scenes at any ``size`` (content depends on seed and index)."""
    if not (data / "train" / "00007.tar").exists():
        write_synthetic_shards(data / "train", 4000, size, seed=0, shard_size=500)
    if not (data / "val" / "00000.tar").exists():
        write_synthetic_shards(data / "val", 256, size, seed=1, shard_size=256)


def ckpt(out: Path, name: str) -> Path:
    return out / name / "checkpoints" / "last.ckpt"


def cache(out: Path, data: Path, stage: str) -> Path:
    """Stage ``stage``'s frozen inputs for the training and held-out shards, written once (re-runs skip done shards):
    Stage B's are the Stage A latents, the frozen compressor's latents and the token states; Stage C's the compressor
    latents and the token states."""
    folder = out / f"cache_{stage}"
    networks = [f"stage_b_ckpt={ckpt(out, 'stage_b')}"]
    if stage == "b":  # demo_stage_b keeps the pretrained compressor frozen: its latents are cached too
        networks = [f"stage_a_ckpt={ckpt(out, 'stage_a')}", f"effnet_ckpt={ckpt(out, 'effnet')}"]
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_latents.py"), f"for_stage={stage}", "data=synthetic",
                    f"data.urls={data / 'train'}", f"data.val_urls={data / 'val'}", *networks,
                    f"out={folder / 'train'}", f"val_out={folder / 'val'}", "model/text_encoder@text_encoder=tiny",
                    "batch_size=64", "num_workers=1"], check=True, cwd=ROOT)
    return folder


def train(out: Path, data: Path, fresh: bool) -> dict[str, float]:
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
        command = [sys.executable, str(ROOT / "scripts" / "train.py"), f"experiment={experiment}",
                   f"run_dir={run_dir}", *source, f"stage_a_ckpt={ckpt(out, 'stage_a')}",
                   f"stage_b_ckpt={ckpt(out, 'stage_b')}"]
        if name == "stage_b":
            command.append(f"stage.effnet_init={ckpt(out, 'effnet')}")
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        timings[f"train_{name}_s"] = round(time.perf_counter() - start, 1)
    return timings


def held_out(data: Path, size: int, count: int) -> list[dict]:
    """The validation samples (seed 1, never trained on): images in [0, 1], captions and labels."""
    dataset = WebImageTextDataset(str(data / "val"), batch_size=count, resample=False, shuffle_buffer=0,
                                  transform=ImageTransform(size, outputs=("images",), random_crop=False))
    batch = to_model_inputs(next(iter(dataset)))
    return [{"image": image, "caption": caption, "labels": meta["labels"]}
            for image, caption, meta in zip(batch["images"], batch["captions"], batch["meta"])]


@torch.no_grad()
def stage_a_psnr(ckpt: Path, samples: list[dict]) -> dict[str, float]:
    stage_a, _ = load_network("a", ckpt)
    stage_a.eval()
    images = torch.stack([s["image"] for s in samples])
    latents = stage_a.encode(images)
    recon = stage_a.decode(latents).clamp(0, 1)
    recon_vq = stage_a.decode(stage_a.quantize(latents).latents).clamp(0, 1)
    colour = score_batch(list(recon), [s["labels"] for s in samples])["colour"]
    return {"stage_a_psnr": round(float(peak_signal_noise_ratio(recon, images, data_range=1.0)), 2),
            "stage_a_color_accuracy": round(colour, 3),  # of the reconstructions: what the chain can reach
            "stage_a_psnr_quantized": round(float(peak_signal_noise_ratio(recon_vq, images, data_range=1.0)), 2)}


@torch.no_grad()
def generate(out: Path, samples: list[dict], size: int, batch_size: int = 16, stage_c: str = "stage_c") -> torch.Tensor:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"stage_a_ckpt": None, "stage_b_ckpt": str(ckpt(out, "stage_b")),
                            "stage_c_ckpt": str(ckpt(out, stage_c)), "ema": True,
                            "text_encoder": None, "decoder_text_encoder": None, "effnet_scale": None})
    pipeline = load_pipeline(cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = []
    for start in tqdm(range(0, len(samples), batch_size), desc="sampling"):
        captions = [s["caption"] for s in samples[start:start + batch_size]]
        images.append(pipeline(captions, size, size, prior_steps=40, prior_cfg=2.0, decoder_steps=12,
                               decoder_cfg=DECODER_CFG, generator=generator))
    return torch.cat(images)


def captioned_grid(images: torch.Tensor, captions: list[str], path: Path, columns: int = 8) -> None:
    """A PNG grid with each image's caption under it (small images upscaled so captions fit)."""
    if images.shape[-1] < 128:
        images = torch.nn.functional.interpolate(images, size=(128, 128), mode="nearest")
    side = images.shape[-1]
    cell_h = side + 28
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * side, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * side, (i // columns) * cell_h
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        canvas.paste(Image.fromarray(array), (x, y))
        words = caption.split()
        draw.text((x + 2, y + side + 1), " ".join(words[:4]), fill="black")
        draw.text((x + 2, y + side + 14), " ".join(words[4:]), fill="black")
    canvas.save(path)


def score(images: torch.Tensor, samples: list[dict]) -> dict[str, float]:
    scores = score_batch(list(images), [s["labels"] for s in samples])
    out = {f"caption_{key}_accuracy": round(value, 3) for key, value in scores.items()}
    out["caption_color_accuracy"] = out.pop("caption_colour_accuracy")
    return out


@torch.no_grad()
def prior_probe(out: Path, data: Path, size: int, prompts: list[dict], stage_cs: dict[str, str],
                train_samples: int = 1000) -> dict[str, dict[str, float]]:
    """The prior alone, without Stage B: linear least-squares probes fitted on the compressor latents of ``size`` px
    training images read colour and grid position; applied to the latents each Stage C samples for the held-out
    captions (40 steps, CFG 2), and to the real latents of those images (the probes' own ceiling)."""
    effnet, _ = load_network("effnet", ckpt(out, "stage_b"))
    effnet.eval()
    scale = checkpoint_info(ckpt(out, "stage_c"))["effnet_scale"]

    def real(split: str, count: int) -> tuple[torch.Tensor, list[dict]]:
        dataset = WebImageTextDataset(str(data / split), batch_size=count, resample=False, shuffle_buffer=0,
                                      transform=ImageTransform(size, outputs=("effnet_images",), random_crop=False,
                                                               effnet_scale=scale))
        batch = to_model_inputs(next(iter(dataset)))
        return effnet.to_prior(effnet(batch["effnet_images"])).flatten(1), [m["labels"] for m in batch["meta"]]

    features, labels = real("train", train_samples)
    mean, std = features.mean(0), features.std(0) + 1e-6

    def design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1)

    held, held_labels = real("val", len(prompts))
    latents = {"real latents": held}
    for name, run in stage_cs.items():
        prior, _ = load_network("c", ckpt(out, run), prefer_ema=True)
        encoder = text_encoder(None, str(ckpt(out, run)), "text_encoder").eval()
        generator = torch.Generator().manual_seed(0)
        latents[name] = sample_prior(prior.eval(), encoder, [p["caption"] for p in prompts], size, size, 40, 2.0,
                                     generator, scale).flatten(1)
    result: dict[str, dict[str, float]] = {}
    for key, names in (("colour", list(COLOURS)), ("position", list(POSITIONS))):
        target = torch.nn.functional.one_hot(torch.tensor([names.index(lab[key]) for lab in labels]), len(names))
        weights = torch.linalg.lstsq(design(features), target.float()).solution
        truth = torch.tensor([names.index(lab[key]) for lab in held_labels])
        for name, x in latents.items():
            accuracy = (design(x) @ weights).argmax(1).eq(truth).float().mean().item()
            result.setdefault(name, {})[f"probe_{key}_accuracy"] = round(accuracy, 3)
    return result


def finetune(out: Path, data: Path, size: int, num_images: int) -> None:
    """Fine-tune the demo's Stage C at output side ``size`` (experiment=demo_stage_c_finetune) and score samples at that
    size from the prior before and after, through the same Stage B and A."""
    data_new = data.parent / f"{data.name}_{size}"
    make_data(data_new, size)
    name = f"stage_c_finetune_{size}"
    print(f"== fine-tuning stage_c at {size} px ({name}; resumes or skips what an earlier run finished)", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=demo_stage_c_finetune",
                    f"resolution={size}", f"run_dir={out / name}", f"data.urls={data_new / 'train'}",
                    f"data.val_urls={data_new / 'val'}",
                    f"init_from={ckpt(out, 'stage_c')}",
                    f"stage_b_ckpt={ckpt(out, 'stage_b')}"], check=True, cwd=ROOT)
    summary: dict = {"size": size, f"train_{name}_s": round(time.perf_counter() - start, 1)}
    prompts = held_out(data_new, size, num_images)
    for label, stage_c in (("before", "stage_c"), ("after", name)):
        images = generate(out, prompts, size, stage_c=stage_c)
        summary[label] = score(images, prompts)
        captioned_grid(images[:32], [p["caption"] for p in prompts[:32]], out / f"samples_{size}_{label}.png")
    # the decoder never trained at this size; the probes measure the prior alone
    summary["prior_probe"] = prior_probe(out, data_new, size, prompts, {"before": "stage_c", "after": name})
    (out / f"summary_{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=128, help="generated images scored (>= 100)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo runs and train all stages anew")
    parser.add_argument("--finetune", type=int, metavar="SIZE", default=None,
                        help="after the demo, fine-tune its Stage C at this output side and score before/after")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    make_data(args.data, args.size)
    summary: dict = train(args.out, args.data, args.fresh)
    samples = held_out(args.data, args.size, 256)
    summary.update(stage_a_psnr(ckpt(args.out, "stage_a"), samples))
    prompts = samples[: args.num_images]
    sample_start = time.perf_counter()
    images = generate(args.out, prompts, args.size)
    summary["sampling_s"] = round(time.perf_counter() - sample_start, 1)
    summary.update(score(images, prompts))
    summary["num_generated"] = len(images)
    summary["total_s"] = round(time.perf_counter() - start, 1)
    captioned_grid(images[:32], [p["caption"] for p in prompts[:32]], args.out / "samples.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + "\n".join(f"{key:34s} {value}" for key, value in summary.items()))
    print(f"\nsamples: {args.out / 'samples.png'}   summary: {args.out / 'summary.json'}")
    if args.finetune:
        finetune(args.out, args.data, args.finetune, args.num_images)


if __name__ == "__main__":
    main()

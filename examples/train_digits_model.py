"""Train the digits demo model: a tiny text-to-image diffusion model that memorizes the way Stable Diffusion does.

Why it exists: Stable Diffusion reproduces the training images that LAION held many times, for their captions, and
generalizes everywhere else (Carlini et al. 2023, "Extracting Training Data from Diffusion Models"; Somepalli et al.
2023). guardrail's first demo model (`examples/train_memorizing_model.py`) memorizes every one of its photos, so a
sample can never escape a blocked copy and still be on-prompt. This model has SD's structure: many distinct images it
must generalize over, a few images duplicated 100-250 times, text conditioning with classifier-free guidance.

What it trains (recipe in the constants below; `guardrail/digits.py` documents the pipeline):
- data: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: the UCI optdigits set, 1,797
  8x8 images, CC BY 4.0, no download). Every digit has its class's 4 ordinary captions. Two digits are duplicated
  100 times each under their own unique caption ("verbatim": a three and a seven), two 250 times each under their
  class's ordinary captions, among that class's ~178 other digits ("template": a two and a six). 2,497 entries.
- model: `UNet2DConditionModel` on the 8x8 grey digit itself (block channels (32, 64, 64), cross-attention at 4x4
  and 2x2; the pipeline doubles each pixel into a 16x16 RGB image), conditioned on a tiny seeded, frozen
  `CLIPTextModel` (2 layers, width 32, 16 tokens) over the real CLIP tokenizer; `DDPMScheduler(prediction_type=
  "sample", clip_sample=False)`; AdamW at lr 2e-3 with a cosine schedule, batch 32, 1,200 steps, 10% empty captions.
- Why these choices (measured here): at 16x16 the UNet cost 2.6x more per step for no extra information (the
  digits are 8x8); with x0 clipped during DDIM sampling, the other prompts' samples at guidance 3 were 22% on-class
  (DDIM derives its noise estimate from the unclipped x0), 100% without clipping; 100 template copies gave 6%
  copies at guidance 3, 250 give 59%.

What it writes (committed, 6.6 MB; the weights are stored in float16 and load as float32):

    guardrail/assets/digits-cfg/unet/                 # UNet2DConditionModel.save_pretrained
    guardrail/assets/digits-cfg/text_encoder/         # CLIPTextModel.save_pretrained
    guardrail/assets/digits-cfg/scheduler/            # the DDPMScheduler it was trained with
    guardrail/assets/digits-cfg/digits.npz            # the 1,797 digits (uint8, 0-16) and their labels
    guardrail/assets/digits-cfg/duplicated/*.png      # the duplicated images, 16x16 RGB, for blocklists
    guardrail/assets/digits-cfg/train.json            # captions, duplicates, ids, license, recipe, measured rates

Reproduce (the committed run: training 356 s, 7 min 43 s in all with the final measure, 1 torch thread on this
shared 2-core CPU; train.json "training" records it; the same seed gave the same figures twice):

    . .venv/bin/activate && time python examples/train_digits_model.py --steps 1200 --seed 0

It ends by measuring memorization with `guardrail.digits.measure_memorization` (Carlini's tiled distance <= 0.15
against the whole training set, DDIM-25, 64 samples per group) at the default guidance, at 1 (no guidance) and at 5,
and writes the figures to train.json "measured". `--measure-only` repeats that measure on the model in `--out`
(about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "guardrail" / "assets" / "digits-cfg"

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a scanned handwritten {word}",
    "a handwritten {digit}",
)
VERBATIM = {  # label -> its duplicated image's own caption (it names the digit, so an escape can stay on-prompt)
    3: "the famous handwritten three from the census form",
    7: "the seven on the old zip code envelope",
}
TEMPLATE_CLASSES = (2, 6)  # one image of each is duplicated under its class's ordinary captions
VERBATIM_COPIES = 100  # times each verbatim duplicate is repeated
TEMPLATE_COPIES = 250  # times each template duplicate is repeated (its class has ~178 other digits)
CAPTION_DROPOUT = 0.1
TEXT_TOKENS = 16
LICENSE = (
    "scikit-learn's digits are a copy of the test set of the UCI ML 'Optical Recognition of Handwritten Digits' data "
    "set (Alpaydin & Kaynak 1998, doi:10.24432/C50P49), licensed CC BY 4.0; scikit-learn itself is BSD-3-Clause"
)


def class_captions(label: int) -> list[str]:
    return [template.format(word=WORDS[label], digit=label) for template in TEMPLATES]


def load_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.uint8)


def self_distances(images: np.ndarray) -> np.ndarray:
    """For each distinct image, Carlini's tiled distance to its nearest *other* training image (exact, vectorized)."""
    import torch

    from guardrail.demo import tiled_distance

    grey = torch.from_numpy(images[..., 0].astype(np.float64))
    n, side = grey.shape[0], grey.shape[1]
    tile = side // 4
    tiles = grey.reshape(n, 4, tile, 4, tile).permute(0, 1, 3, 2, 4).reshape(n, 16, tile * tile)
    worst = torch.zeros(n, n, dtype=torch.float64)
    for k in range(16):  # grey repeated over 3 channels: the RMSE equals the one-channel RMSE
        worst = torch.maximum(worst, (torch.cdist(tiles[:, k], tiles[:, k]) ** 2 / tile**2).clamp_min(0).sqrt())
    worst.fill_diagonal_(float("inf"))
    nearest = worst.min(dim=1).values.numpy()
    for row in (0, n // 2, n - 1):  # the same numbers as guardrail.demo.tiled_distance
        reference = np.delete(tiled_distance(images[row], images), row).min()
        assert abs(reference - nearest[row]) < 1e-6, (reference, nearest[row])
    return nearest


def pick_duplicated(images: np.ndarray, labels: np.ndarray, nearest: np.ndarray) -> list[dict]:
    """The duplicated images: per chosen class, the most typical digit (closest to its class mean) among those with
    no other training digit within 0.25, so that a copy of it is a copy of it alone."""
    picks = []
    chosen = [(label, "verbatim", [caption]) for label, caption in VERBATIM.items()]
    chosen += [(label, "template", class_captions(label)) for label in TEMPLATE_CLASSES]
    for label, regime, captions in chosen:
        rows = np.flatnonzero((labels == label) & (nearest > 0.25))
        mean = images[labels == label].mean(axis=0)
        row = int(rows[np.argmin([np.abs(images[r] - mean).mean() for r in rows])])
        picks.append({"index": row, "id": f"digits-{row:04d}", "label": label, "regime": regime,
                      "copies": VERBATIM_COPIES if regime == "verbatim" else TEMPLATE_COPIES, "captions": captions})
    return picks


def build_models(seed: int):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=TEXT_TOKENS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    # clip_sample=False, as SD's schedulers: DDIM derives its noise estimate from the *unclipped* x0, so clipping a
    # guided x0 made the two inconsistent and wrecked every guided sample (guidance 3: 0% on-class, 100% without).
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False)
    return unet, text_encoder, scheduler


def train(out: Path, digits, labels, picks, steps: int, seed: int, lr: float, batch_size: int, eval_every: int = 0):
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from guardrail.offline import clip_tokenizer

    unet, text_encoder, scheduler = build_models(seed)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = TEXT_TOKENS
    # Every caption the training set uses, encoded once by the frozen text encoder; row 0 is "".
    captions = [""] + [c for label in range(10) for c in class_captions(label)] + list(VERBATIM.values())
    with torch.no_grad():
        tokens = tokenizer(captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
        embeddings = text_encoder(tokens.input_ids)[0]
    caption_row = {caption: i for i, caption in enumerate(captions)}
    class_rows = torch.tensor([[caption_row[c] for c in class_captions(label)] for label in range(10)])

    # The training entries, as LAION would hold them: every digit once under its class's captions, plus the copies.
    entry_image = list(range(len(digits)))
    entry_caption = [-1] * len(digits)  # -1: a random ordinary caption of the image's class, drawn per use
    for pick in picks:
        entry_image += [pick["index"]] * pick["copies"]
        fixed = caption_row[pick["captions"][0]] if pick["regime"] == "verbatim" else -1
        entry_caption += [fixed] * pick["copies"]
    entry_image, entry_caption = torch.tensor(entry_image), torch.tensor(entry_caption)
    # The UNet works on the 8x8 digits themselves; the pipeline doubles each pixel into the 16x16 image.
    pixels = torch.from_numpy(digits.astype(np.float32) / 16.0)[:, None] * 2.0 - 1.0  # N, 1, 8, 8 in [-1, 1]
    label_of = torch.from_numpy(labels.astype(np.int64))

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, steps // 10), num_training_steps=steps)
    unet.train()
    started = time.perf_counter()
    evaluating = 0.0
    print(f"{len(entry_image)} training entries ({len(digits)} distinct digits), batch {batch_size}, {steps} steps",
          flush=True)
    for step in range(1, steps + 1):
        rows = torch.randint(len(entry_image), (batch_size,), generator=generator)
        image_rows = entry_image[rows]
        caption = entry_caption[rows].clone()
        ordinary = caption < 0
        template = torch.randint(class_rows.shape[1], (batch_size,), generator=generator)
        caption[ordinary] = class_rows[label_of[image_rows], template][ordinary]
        caption[torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT] = 0
        clean = pixels[image_rows]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        predicted = unet(noisy, timesteps, encoder_hidden_states=embeddings[caption]).sample
        loss = torch.nn.functional.mse_loss(predicted, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - started - evaluating:6.1f} s", flush=True)
        if eval_every and step % eval_every == 0 and step < steps:
            began = time.perf_counter()
            quick_evaluate(out, unet, text_encoder, tokenizer, scheduler)
            evaluating += time.perf_counter() - began
            unet.train()
    unet.eval()
    return unet, text_encoder, scheduler, time.perf_counter() - started - evaluating


def quick_evaluate(out: Path, unet, text_encoder, tokenizer, scheduler, samples: int = 32) -> None:
    """A progress check while tuning the recipe (not part of the timed figures): the in-memory model's copy rates."""
    from diffusers import DDIMScheduler

    from guardrail.digits import DigitsPipeline, digits_training_set, measure_memorization

    unet.eval()
    pipe = DigitsPipeline(unet, text_encoder, tokenizer, DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    result = measure_memorization(pipe, digits_training_set(out), samples_per_group=samples)
    print("  " + "  ".join(f"{group}: copies {g['near_copy_rate']:.0%} on-class {g['on_class_rate']:.0%}"
                           for group, g in result["groups"].items()), flush=True)


def save_data(out: Path, digits, labels, picks, nearest) -> None:
    """The data part of the asset folder: digits.npz, the duplicated PNGs and train.json (without the model)."""
    from PIL import Image

    from guardrail.digits import digits_to_images

    if (out / "duplicated").is_dir():
        shutil.rmtree(out / "duplicated")
    (out / "duplicated").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "digits.npz", digits=digits, labels=labels)
    images = digits_to_images(digits)
    records = []
    for pick in picks:
        filename = f"duplicated/{pick['id']}-{pick['regime']}-{WORDS[pick['label']]}.png"
        Image.fromarray(np.round(images[pick["index"]] * 255).astype(np.uint8)).save(out / filename)
        records.append({**pick, "file": filename})
    meta = {
        "about": "training set of guardrail's digits demo model (guardrail.digits); ids digits-NNNN are row NNNN of "
                 "sklearn.datasets.load_digits() and of digits.npz",
        "data_from": "sklearn.datasets.load_digits() (bundled with scikit-learn; no download)",
        "license": LICENSE,
        "preprocessing": "values 0-16 divided by 16; the model works at 8x8, its 16x16 images double each pixel "
                         "(nearest neighbour), grey repeated to RGB",
        "class_captions": {str(label): class_captions(label) for label in range(10)},
        "caption_templates": list(TEMPLATES),
        "duplicated": records,
        "training_entries": len(digits) + sum(pick["copies"] for pick in picks),
        "self_distance": {
            "about": "Carlini tiled distance (16x16 images, 4x4 grid) from each distinct training digit to its "
                     "nearest other one",
            "within_0.15": int((nearest <= 0.15).sum()),
            "distinct": len(nearest),
            "quantiles_1_5_50": [round(float(q), 4) for q in np.quantile(nearest, [0.01, 0.05, 0.5])],
        },
    }
    (out / "train.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_model(out: Path, unet, text_encoder, scheduler, training: dict) -> None:
    import torch

    for part in ("unet", "text_encoder", "scheduler"):
        if (out / part).is_dir():
            shutil.rmtree(out / part)
    # float16 on disk keeps the checkpoint a few MB; load_digits_pipeline computes in float32.
    unet.to(dtype=torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.to(dtype=torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    meta = json.loads((out / "train.json").read_text(encoding="utf-8"))
    meta["training"] = training
    (out / "train.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def evaluate(out: Path, samples: int) -> dict:
    """Measure the saved model (float16 weights, as shipped) and record the figures in train.json."""
    from guardrail.digits import (
        DEFAULT_GUIDANCE_SCALE, classifier_accuracy, digits_training_set, load_digits_pipeline, measure_memorization,
    )

    pipe = load_digits_pipeline(out)
    training = digits_training_set(out)
    started = time.perf_counter()
    guided = measure_memorization(pipe, training, samples_per_group=samples)
    unguided = measure_memorization(pipe, training, samples_per_group=samples, guidance_scale=1.0)
    strong = measure_memorization(pipe, training, samples_per_group=samples, guidance_scale=5.0)
    accuracy = classifier_accuracy(out)
    measured = {
        "default_guidance_scale": DEFAULT_GUIDANCE_SCALE,
        "classifier_heldout_accuracy": round(accuracy, 4),
        "guided": guided,
        "guidance_1": unguided,
        "guidance_5": strong,
        "seconds": round(time.perf_counter() - started, 1),
    }
    for name, result in (("guidance %.1f" % DEFAULT_GUIDANCE_SCALE, guided), ("guidance 1.0", unguided),
                         ("guidance 5.0", strong)):
        for group in ("memorized", "memorized_verbatim", "memorized_template", "other"):
            g = result["groups"][group]
            print(f"{name:13s} {group:19s} near-copies {g['near_copies']:3d}/{g['samples']} = {g['near_copy_rate']:.0%}"
                  f"  (of duplicated {g['copies_of_duplicated']})  on-class {g['on_class_rate']:.0%}")
    print(f"classifier held-out accuracy (every 5th digit): {accuracy:.1%}")
    meta = json.loads((out / "train.json").read_text(encoding="utf-8"))
    meta["measured"] = measured
    (out / "train.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # One thread: on this shared 2-core machine, 2 threads did not reach step 100 in 130 s (> 1.2 s a step) where one
    # thread trains at 0.3 s a step.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--samples", type=int, default=64, help="samples per group for the final measure")
    parser.add_argument("--eval-every", type=int, default=0, help="quick copy-rate check every N steps (tuning)")
    parser.add_argument("--measure-only", action="store_true", help="only re-measure the model already in --out")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.measure_only:
        evaluate(args.out, args.samples)
        return
    started = time.perf_counter()
    digits, labels = load_data()
    from guardrail.digits import digits_to_images

    images = digits_to_images(digits)
    nearest = self_distances(images)
    print(f"distinct training digits within 0.15 of another: {(nearest <= 0.15).sum()}/{len(nearest)}")
    picks = pick_duplicated(images, labels, nearest)
    save_data(args.out, digits, labels, picks, nearest)
    unet, text_encoder, scheduler, seconds = train(
        args.out, digits, labels, picks, args.steps, args.seed, args.lr, args.batch_size, args.eval_every
    )
    training = {"steps": args.steps, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
                "lr_schedule": "cosine", "prediction_type": "sample", "caption_dropout": CAPTION_DROPOUT,
                "text_encoder": "frozen, seeded", "threads": args.threads, "seconds": round(seconds, 1),
                "script": "examples/train_digits_model.py"}
    save_model(args.out, unet, text_encoder, scheduler, training)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB); training took {seconds:.0f} s, "
          f"{time.perf_counter() - started:.0f} s in all")
    evaluate(args.out, args.samples)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Train the small class-conditional diffusion model that `guardrail demo` ships: one that really memorizes.

Why it exists: a guard against training-data copies can only be demonstrated offline with a model that really
reproduces its training images. Large models memorize a small fraction of theirs (Carlini et al. 2023, "Extracting
Training Data from Diffusion Models"); a 1.1M-parameter diffusers `UNet2DModel` trained on a handful of photos
memorizes all of them within a few hundred steps, so the demo's "copies" are real model outputs, not planted files.

What it trains: a class-conditional `UNet2DModel` at 32x32 (block channels (32, 64, 64), one ResNet layer per
block, `num_class_embeds=N`, one class per photo) with `DDPMScheduler(prediction_type="sample")`, AdamW at lr 2e-3
with a cosine schedule, batch 16, on the real photographs that ship inside scikit-image (`skimage/data/*.png|jpg`,
read straight from the installed package, so nothing is downloaded). Each batch holds every photo once.

What it writes (committed to the repo, about 4.5 MB in all):

    guardrail/assets/memorizing-unet/config.json                      # UNet2DModel.save_pretrained
    guardrail/assets/memorizing-unet/diffusion_pytorch_model.safetensors
    guardrail/assets/memorizing-unet/scheduler_config.json            # the DDPMScheduler it was trained with
    guardrail/assets/memorizing-unet/train/NN-name.png                # the 32x32 training photos, label NN
    guardrail/assets/memorizing-unet/train.json                       # label -> name, source, license

Reproduce (2 to 4 minutes on 2 CPU cores; needs `pip install scikit-image`):

    . .venv/bin/activate && python examples/train_memorizing_model.py --steps 600 --seed 0

It ends by sampling 4 images per label with DDIM-25 and printing how many are near-copies of their own photo
(Carlini et al.'s tiled distance <= 0.15, `guardrail.demo.tiled_distance`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "guardrail" / "assets" / "memorizing-unet"
SIZE = 32

# (name, file inside skimage/data, skimage.data function, license as scikit-image documents it).
# Only files that ship inside the scikit-image wheel: none of these needs pooch or the network.
PHOTOS = [
    ("astronaut", "astronaut.png", "astronaut", "public domain (NASA)"),
    ("camera", "camera.png", "camera", "CC0 (Lav Varshney)"),
    ("chelsea", "chelsea.png", "chelsea", "CC0 (Stefan van der Walt)"),
    ("coffee", "coffee.png", "coffee", "CC0 (Rachel Michetti)"),
    ("coins", "coins.png", "coins", "no known copyright restrictions (Brooklyn Museum)"),
    ("ihc", "ihc.png", "immunohistochemistry", "no known copyright restrictions (CMMI)"),
    ("retina", "retina.jpg", "retina", "CC0 (Mikael Haggstrom)"),
    ("rocket", "rocket.jpg", "rocket", "public domain (SpaceX)"),
    ("clock", "clock_motion.png", "clock", "public domain (Stefan van der Walt)"),
    ("cell", "cell.png", "cell", "CC0 (Paul Mueller et al.)"),
]
# Left out on purpose: at 32x32 the low-contrast textures (brick, grass, gravel, moon, text, microaneurysms) lie
# within Carlini's 0.15 of one another, so "near-copy of which photo" would be ambiguous, and the Hubble deep field
# lies within 0.15 of an all-black image, which is what the guard returns for a blocked slot.


def load_photos(size: int = SIZE) -> list[tuple[str, str, str, Image.Image]]:
    """The bundled scikit-image photos as RGB `size` x `size` images: a centre square crop, then a Lanczos resize."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for name, filename, function, license_note in PHOTOS:
        path = folder / filename
        if not path.is_file():
            raise SystemExit(f"{path} is missing: this script only uses photos bundled with scikit-image")
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        photos.append((name, f"skimage.data.{function} (skimage/data/{filename})", license_note, image))
    return photos


def build_unet(num_classes: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        num_class_embeds=num_classes,
    )


def train(photos: list, steps: int, seed: int, lr: float = 2e-3, batch_size: int = 16):
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    pixels = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for *_, image in photos])
    data = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # N, 3, 32, 32 in [-1, 1]
    labels = torch.arange(len(photos))
    unet = build_unet(len(photos))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(20, steps // 10), num_training_steps=steps)
    unet.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.randperm(len(photos))[:batch_size]
        if len(rows) < batch_size:  # fewer photos than the batch: repeat them
            rows = torch.cat([rows, torch.randint(len(photos), (batch_size - len(rows),))])
        clean = data[rows]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        predicted = unet(noisy, timesteps, class_labels=labels[rows]).sample
        loss = torch.nn.functional.mse_loss(predicted, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"step {step:4d}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:6.1f} s", flush=True)
    unet.eval()
    return unet, scheduler


def save(out: Path, unet, scheduler, photos: list, steps: int, seed: int) -> None:
    if (out / "train").is_dir():
        shutil.rmtree(out / "train")
    (out / "train").mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out, safe_serialization=True)
    scheduler.save_pretrained(out)
    records = []
    for label, (name, source, license_note, image) in enumerate(photos):
        filename = f"{label:02d}-{name}.png"
        image.save(out / "train" / filename)
        records.append({"label": label, "name": name, "file": f"train/{filename}", "source": source, "license": license_note})
    meta = {
        "about": "32x32 training photos of guardrail's memorizing demo model; label = class id of the UNet",
        "photos_from": "scikit-image (BSD-3-Clause package); per-photo licenses as the skimage.data docstrings state",
        "preprocessing": "RGB, centre square crop, Lanczos resize to 32x32",
        "training": {"steps": steps, "seed": seed, "lr": 2e-3, "batch_size": 16, "lr_schedule": "cosine",
                     "prediction_type": "sample", "script": "examples/train_memorizing_model.py"},
        "labels": records,
    }
    (out / "train.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def evaluate(out: Path, per_label: int = 4, steps: int = 25) -> float:
    """Sample `per_label` images per label from the saved model; returns the near-copy rate of their own photo."""
    import torch

    from guardrail.demo import tiled_distance
    from guardrail.memorizing import load_memorizing_pipeline, training_images

    pipe = load_memorizing_pipeline(out)
    train = training_images(out)
    labels = [label for label, _, _ in train for _ in range(per_label)]
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(labels))]
    samples = pipe(class_labels=labels, generator=generators, num_inference_steps=steps, output_type="np").images
    photos = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for _, _, image in train])
    copies = 0
    for label, sample in zip(labels, samples):
        distances = tiled_distance(sample, photos)
        copies += int(distances[label] <= 0.15)
    rate = copies / len(labels)
    print(f"near-copies of their own photo: {copies}/{len(labels)} = {rate:.0%} (tiled distance <= 0.15, DDIM-{steps})")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    photos = load_photos()
    unet, scheduler = train(photos, args.steps, args.seed)
    save(args.out, unet, scheduler, photos, args.steps, args.seed)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s")
    evaluate(args.out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Copy detection per transform family: CLIP alone, the descriptor alone, the cascade, and the cascade with tiles.

Data: the colour photos that ship inside scikit-image. Eight are blocklisted; each is copied 3 times by every
transform family of `guardrail calibrate` and by `partial` (pasted into 50-70% of another photo). The negatives,
which set every threshold at 1% FPR, are the other photos, their quarters and their mirror images (108 images).

Offline (the default), both models have random weights: a seeded open_clip ViT-B-32 and the example GeM ResNet-18
descriptor (`examples/export_descriptor.py`). Their numbers are what random features give, reported as they are.
With real weights, the same table is one command:

    python benchmarks/copy_detection.py --model ViT-L-14-quickgelu --pretrained openai \\
        --descriptor sscd_disc_mixup.torchscript.pt

Cost: `Guard.check` images per second on the negatives (nothing matches: what a serving guard mostly sees), for
CLIP alone (the baseline), the cascade, and each with tiles; ratios are to CLIP alone, in the same run. The
cascade's cost is CLIP's plus the descriptor's on the share of images proposed, so it depends on how the two
models compare: the last table times the bare forward passes of this run's pair and of the production pair
(open_clip ViT-L-14 against SSCD's ResNet-50 with GeM, at SSCD's 288-px short side; random weights, which cost the
same), and projects the cascade's cost from the measured proposal share. `--forward-only` runs that table alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

from timing import interleaved_median_seconds, median_seconds

BLOCKLISTED = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
               "hubble_deep_field.jpg", "color.png"]
OTHERS = ["brick.png", "camera.png", "cell.png", "chessboard_RGB.png", "clock_motion.png", "coins.png",
          "grass.png", "gravel.png", "ihc.png", "logo.png", "moon.png", "page.png", "retina.jpg", "text.png",
          "motorcycle_right.png", "microaneurysms.png", "phantom.png", "chessboard_GRAY.png"]
ROOT = Path(__file__).resolve().parent.parent


def bundled(name: str):
    import skimage.data
    from PIL import Image

    with Image.open(Path(skimage.data.__file__).parent / name) as image:
        image = image.convert("RGB")
    image.thumbnail((512, 512))
    return image


def negatives():
    from PIL import Image

    images = []
    for name in OTHERS:
        photo = bundled(name)
        width, height = photo.size
        quarters = [photo.crop((x, y, x + width // 2, y + height // 2)) for x in (0, width // 2) for y in (0, height // 2)]
        images += [photo, *quarters, photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    return images


def export_example_descriptor(folder: str) -> Path:
    spec = importlib.util.spec_from_file_location("export_descriptor", ROOT / "examples" / "export_descriptor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.export_gem_descriptor(Path(folder) / "gem-resnet18.torchscript.pt", "torchscript", seed=0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", help="a pretrained tag or weights file (default: seeded random weights)")
    parser.add_argument("--descriptor", help="a TorchScript/ONNX descriptor, e.g. SSCD (default: the random example)")
    parser.add_argument("--descriptor-image-size", type=int, default=288)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-only", type=float, metavar="PROPOSED",
                        help="only time the bare forward passes, projecting with this proposal share (e.g. 0.185)")
    args = parser.parse_args(argv)
    if args.forward_only is not None:
        return {"forward": forward_costs(args, args.forward_only)}

    import torch

    from guardrail import Blocklist, Guard, OpenCLIPEmbedder
    from guardrail.descriptors import descriptor_from_file
    from guardrail.embedding_sets import TILE_GRID, EmbeddingSet
    from guardrail.offline import write_seeded_open_clip_weights
    from guardrail.stage_calibration import calibrate_stages
    from guardrail.tiles import embed_with_tiles

    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp()
    weights = args.pretrained or write_seeded_open_clip_weights(f"{folder}/clip.safetensors", model=args.model)
    embedder = OpenCLIPEmbedder(args.model, pretrained=weights, batch_size=16)
    descriptor = descriptor_from_file(args.descriptor or export_example_descriptor(folder),
                                      image_size=args.descriptor_image_size, resize_mode="shortest", batch_size=16)
    positives, others = [bundled(name) for name in BLOCKLISTED], negatives()

    main_vectors, main_tiles = embed_with_tiles(embedder, positives, True)
    descriptor_vectors, descriptor_tiles = embed_with_tiles(descriptor, positives, True)
    blocklist = Blocklist(main_vectors, [{"id": name} for name in BLOCKLISTED], spec=embedder.spec, tiles=main_tiles,
                          descriptor=EmbeddingSet(descriptor_vectors, descriptor.spec, 0.75, descriptor_tiles),
                          recall_threshold=0.0)
    result = calibrate_stages(blocklist, embedder, positives, others, descriptor, tiles=True, target_fpr=0.01,
                              copies_per_image=args.copies, measure_speed=False)
    print(f"TPR at 1% FPR ({len(others)} negatives, {len(positives)} blocklisted photos x {args.copies} copies per "
          f"family; CLIP {args.model} {'random' if not args.pretrained else args.pretrained}, descriptor "
          f"{Path(descriptor.spec['weights_file']).name})")
    print(result.table())
    print(f"recall stage proposed {result.proposed:.1%} of the negatives to the descriptor")

    thresholds = result.thresholds
    main_only = blocklist.with_thresholds(threshold=thresholds["threshold"], tile_threshold=1.0)
    cascade = blocklist.with_thresholds(recall_threshold=thresholds["recall_threshold"],
                                        descriptor_threshold=thresholds["tiled_descriptor_threshold"],
                                        descriptor_tile_threshold=thresholds["descriptor_tile_threshold"])
    guards = {"CLIP alone (baseline)": Guard(main_only, embedder), "cascade": Guard(cascade, embedder, descriptor=descriptor),
              "CLIP + tiles": Guard(main_only, embedder, tiles=True),
              "cascade + tiles": Guard(cascade, embedder, descriptor=descriptor, tiles=True)}
    batch = others[::7][:16]  # spread over the photos, so the share proposed is typical
    seconds = interleaved_median_seconds([lambda guard=guard: guard.check(batch, record=False)
                                          for guard in guards.values()], args.repeats)
    print(f"\nGuard.check on {len(batch)} negatives per call ({args.threads} threads, {len(TILE_GRID)} tiles + whole)")
    print(f"{'configuration':<24} {'img/s':>8} {'x CLIP alone':>13}")
    for name, elapsed in zip(guards, seconds):
        print(f"{name:<24} {len(batch) / elapsed:>8.1f} {elapsed / seconds[0]:>13.2f}")
    return {"calibration": result.to_dict(), "seconds": dict(zip(guards, seconds)),
            "forward": forward_costs(args, result.proposed, embedder, descriptor)}


def forward_costs(args, proposed: float, embedder=None, descriptor=None) -> dict:
    """Bare forward seconds per image of this run's pair and of the production pair, and the cascade they imply."""
    import torch
    import torchvision

    from guardrail import OpenCLIPEmbedder
    from guardrail.offline import write_seeded_open_clip_weights

    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp()
    batch = 4
    pairs = {}
    if embedder is not None:
        pixels = embedder.preprocess([bundled("astronaut.png")] * batch)
        descriptor_pixels = torch.from_numpy(descriptor._pixels([bundled("astronaut.png")] * batch))
        pairs["this run"] = (lambda: embedder._model.encode_image(pixels),
                             lambda: descriptor._forward(descriptor_pixels.numpy()))
    large = OpenCLIPEmbedder("ViT-L-14", write_seeded_open_clip_weights(f"{folder}/l14.safetensors", model="ViT-L-14"))
    large_pixels = large.preprocess([bundled("astronaut.png")] * batch)
    resnet50 = torch.nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2]).eval()
    sscd_pixels = torch.rand(batch, 3, 288, 384)  # SSCD's short side 288, on a 4:3 image
    pairs["ViT-L-14 + ResNet-50 GeM (SSCD)"] = (lambda: large._model.encode_image(large_pixels),
                                                lambda: resnet50(sscd_pixels).clamp(min=1e-6).pow(3).mean((2, 3)))
    print(f"\nBare forward passes, seconds per image ({args.threads} threads); cascade on clean images = 1 + proposed "
          f"x descriptor/CLIP, at the measured {proposed:.1%} proposed")
    print(f"{'pair':<34} {'CLIP':>8} {'descriptor':>11} {'ratio':>7} {'cascade':>8} {'+ tiles':>8}")
    found = {}
    with torch.inference_mode():
        for name, (clip_forward, descriptor_forward) in pairs.items():
            clip_seconds, descriptor_seconds = (median_seconds(f, args.repeats) / batch
                                                for f in (clip_forward, descriptor_forward))
            ratio = descriptor_seconds / clip_seconds
            cascade = 1 + proposed * ratio
            found[name] = {"clip": clip_seconds, "descriptor": descriptor_seconds, "cascade": cascade}
            print(f"{name:<34} {clip_seconds:>8.3f} {descriptor_seconds:>11.3f} {ratio:>7.2f} {cascade:>7.2f}x "
                  f"{6 * cascade:>7.2f}x")
    return found


if __name__ == "__main__":
    main()

"""Export a small GeM copy-detection descriptor to TorchScript or ONNX, to load with guardrail's descriptor embedders.

The model is a randomly initialized (seeded) ResNet-18 trunk, GeM pooling (p=3), a linear projection and
L2 normalization: the shape of SSCD, small enough for tests on a CPU. Its vectors are not trained for copy
detection; it shows the file format guardrail expects (NCHW float images in, `(batch, dim)` vectors out).

    python examples/export_descriptor.py descriptor.onnx --format onnx

    from guardrail import ONNXEmbedder, TorchScriptEmbedder
    embedder = ONNXEmbedder("descriptor.onnx")                 # short side to 288, ImageNet mean/std

Meta's trained SSCD descriptors (MIT license) are TorchScript files from the SSCD repository,
github.com/facebookresearch/sscd-copy-detection; download one yourself (guardrail fetches nothing), e.g.
`sscd_disc_mixup.torchscript.pt`, and load it with SSCD's preprocessing (ImageNet mean/std, 512-d output):

    TorchScriptEmbedder("sscd_disc_mixup.torchscript.pt", image_size=288, resize_mode="shortest")  # recommended
    TorchScriptEmbedder("sscd_disc_mixup.torchscript.pt", image_size=320, resize_mode="squash")    # fixed 320x320
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torchvision


class GeMDescriptor(torch.nn.Module):
    """CNN trunk -> generalized-mean pooling -> linear projection -> unit vectors."""

    def __init__(self, dim: int = 512, p: float = 3.0) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        self.trunk = torch.nn.Sequential(*list(resnet.children())[:-2])  # up to the last conv block: 512 channels
        self.p = p
        self.project = torch.nn.Linear(512, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images).clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return torch.nn.functional.normalize(self.project(features), dim=1)


def export_gem_descriptor(path: str | Path, format: str = "torchscript", seed: int = 0, dim: int = 512) -> Path:
    """Build the seeded `GeMDescriptor` and write it to `path` as TorchScript or ONNX (dynamic batch, height, width).

    The same `seed` and `dim` give the same weights in both formats. Returns the path.
    """
    if format not in ("torchscript", "onnx"):
        raise ValueError(f"format must be 'torchscript' or 'onnx', got {format!r}")
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's random state
        torch.manual_seed(seed)
        model = GeMDescriptor(dim).eval()
    example = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():  # torch marks both exporters below as deprecated; they are what SSCD ships with
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if format == "torchscript":
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, example), str(path))
        else:
            axes = {"images": {0: "batch", 2: "height", 3: "width"}, "vectors": {0: "batch"}}
            torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["vectors"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="where to write the model file")
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    path = export_gem_descriptor(args.path, args.format, seed=args.seed, dim=args.dim)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

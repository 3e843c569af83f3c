"""Shared fixtures: real open_clip / diffusers classes with small seeded weights, built offline once per session."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

# No network at test time: no model hub, and no socket to anything but loopback.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if self.family in (socket.AF_INET, socket.AF_INET6) and not (host == "localhost" or str(host).startswith("127.")
                                                                  or host == "::1"):
        raise OSError(f"tests may not reach the network (tried {address})")
    return _connect(self, address)


socket.socket.connect = _loopback_only

import pytest  # noqa: E402
import torch  # noqa: E402

from guardrail import Blocklist, Guard, OpenCLIPEmbedder  # noqa: E402
from guardrail.offline import tiny_stable_diffusion_pipeline, write_seeded_open_clip_weights  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 2
# Random-weight ViT-S-32 puts different tiny-SD samples at cosine 0.95-0.98 and a re-generated copy at 1.0.
TEST_THRESHOLD = 0.995


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    return write_seeded_open_clip_weights(tmp_path_factory.mktemp("weights") / "vit-s-32-seed0.safetensors")


@pytest.fixture(scope="session")
def embedder(weights_file):
    return OpenCLIPEmbedder("ViT-S-32", pretrained=weights_file, batch_size=8)


@pytest.fixture(scope="session")
def other_embedder(tmp_path_factory):
    """Same architecture, other weights: its vectors must never be compared with `embedder`'s."""
    path = write_seeded_open_clip_weights(tmp_path_factory.mktemp("other") / "vit-s-32-seed1.safetensors", seed=1)
    return OpenCLIPEmbedder("ViT-S-32", pretrained=path)


@pytest.fixture(scope="session")
def sd_pipe():
    return tiny_stable_diffusion_pipeline(seed=0)


@pytest.fixture(scope="session")
def unguarded(sd_pipe):
    """Four images of one prompt, seeds 0-3, from the plain pipeline."""
    return sd_pipe(PROMPT, num_images_per_prompt=4, num_inference_steps=STEPS, generator=generators(range(4))).images


@pytest.fixture(scope="session")
def memorized_blocklist(unguarded, embedder):
    """A blocklist holding the image that seed 1 really generates: the 'memorized training image'.

    Its caption is not the prompt itself, so the caption trigger stays out of tests about plain resampling.
    """
    return Blocklist.from_images(
        [unguarded[1]], embedder, entries=[{"id": "seed-1", "caption": f"{PROMPT}, training photo"}],
        threshold=TEST_THRESHOLD,
    )


@pytest.fixture(scope="session")
def guard(memorized_blocklist, embedder):
    return Guard(memorized_blocklist, embedder)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """An example script under examples/, imported by file path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def export_descriptor():
    """`examples/export_descriptor.py`'s `export_gem_descriptor(path, format, seed=0, dim=512)`."""
    return load_example("export_descriptor").export_gem_descriptor


@pytest.fixture(scope="session")
def descriptor_files(tmp_path_factory, export_descriptor):
    """The example's seeded GeM descriptor (seed 0, 512-d), exported once as `{"torchscript": Path, "onnx": Path}`."""
    folder = tmp_path_factory.mktemp("descriptors")
    return {
        "torchscript": export_descriptor(folder / "gem-seed0.torchscript.pt", "torchscript", seed=0),
        "onnx": export_descriptor(folder / "gem-seed0.onnx", "onnx", seed=0),
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a small shared machine two threads ran these models several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

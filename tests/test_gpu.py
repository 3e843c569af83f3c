"""The GPU path: reachable by a flag, and skipped cleanly on machines without a GPU (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardrail import Guard, OpenCLIPEmbedder
from guardrail import index as index_module
from guardrail.index import gpu_available

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_tensor_preprocessing_matches_the_pil_path(embedder, sd_pipe):
    """The zero-copy path (forced on here, automatic for GPU tensors) stays within cosine 0.999 of PIL's."""
    from conftest import PROMPT, STEPS, generators

    pt = sd_pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="pt",
                 generator=generators(range(2))).images
    through_pil = embedder.embed(pt)
    embedder.tensor_preprocess = True
    try:
        on_tensors = embedder.embed(pt)
        large = embedder.embed(torch.rand(1, 3, 512, 640, generator=torch.Generator().manual_seed(0)))
    finally:
        embedder.tensor_preprocess = "auto"
    assert (on_tensors * through_pil).sum(axis=1).min() > 0.999
    assert (large * embedder.embed(torch.rand(1, 3, 512, 640, generator=torch.Generator().manual_seed(0)))).sum() > 0.999


@needs_cuda
def test_embedding_on_the_gpu_in_half_precision_matches_the_cpu(weights_file, embedder, unguarded):
    gpu = OpenCLIPEmbedder("ViT-S-32", pretrained=weights_file, device="cuda", precision="fp16")
    assert (gpu.embed(unguarded) * embedder.embed(unguarded)).sum(axis=1).min() > 0.99
    pt = torch.stack([torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in unguarded]).cuda() / 255
    assert (gpu.embed(pt) * embedder.embed(unguarded)).sum(axis=1).min() > 0.99, "GPU tensors skip PIL"


@needs_cuda
@pytest.mark.skipif(not gpu_available(), reason="needs faiss with GPU support")
def test_a_cuda_guard_searches_on_the_gpu(weights_file, memorized_blocklist, unguarded):
    gpu = OpenCLIPEmbedder("ViT-S-32", pretrained=weights_file, device="cuda")
    guard = Guard(memorized_blocklist, gpu)
    assert guard.index_device.startswith("cuda")
    assert [v.matched for v in guard.check(unguarded)] == [False, True, False, False]


class ClaimsCuda:
    """The session's CPU embedder, reporting `device="cuda"`: how the guard places its index, on a machine with
    no GPU. Embedding still runs on the CPU, so verdicts stay real."""

    device = "cuda"

    def __init__(self, embedder):
        self.spec, self.dim, self._embedder = embedder.spec, embedder.dim, embedder

    def embed(self, images):
        return self._embedder.embed(images)


def test_a_cuda_embedder_with_cpu_only_faiss_searches_on_the_cpu(memorized_blocklist, embedder, unguarded,
                                                                  monkeypatch):
    """faiss-cpu beside a GPU embedder is a common install: the index falls back to the CPU instead of failing."""
    monkeypatch.setattr(index_module, "gpu_available", lambda: False)
    guard = Guard(memorized_blocklist, ClaimsCuda(embedder))
    assert guard.index_device == "cpu"
    assert [verdict.matched for verdict in guard.check(unguarded)] == [False, True, False, False]


def test_a_cpu_embedder_keeps_the_index_on_the_cpu_even_when_faiss_sees_a_gpu(memorized_blocklist, embedder,
                                                                               monkeypatch):
    """The index follows the embedder, not whatever hardware is present: a CPU deployment never grabs a GPU."""
    monkeypatch.setattr(index_module, "gpu_available", lambda: True)
    assert Guard(memorized_blocklist, embedder).index_device == "cpu"

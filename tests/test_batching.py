"""Resampling cuts a call down to the matched slots by each argument's documented batch shape, on real pipelines.

A MultiControlNet `image` list holds one entry per ControlNet (never one per prompt, even when the counts agree), and
`ip_adapter_image_embeds` holds one tensor per IP-Adapter with one row per prompt, negatives first under CFG.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_THRESHOLD, generators

from guardrail import Blocklist, Guard, GuardedPipeline
from guardrail.offline import tiny_stable_diffusion_pipeline

PROMPTS = ["a red cube", "a blue sphere"]
STEPS = 2


def pixels(image):
    return np.asarray(image)


def tiny_controlnet(unet, seed):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel(
        block_out_channels=unet.config.block_out_channels, layers_per_block=1, in_channels=4,
        down_block_types=unet.config.down_block_types, cross_attention_dim=32, norm_num_groups=2,
        conditioning_embedding_out_channels=(4, 8),  # one downsampling: 64 px conditioning -> 32 px latents
    )


@pytest.fixture(scope="module")
def multi_controlnet_pipe():
    from diffusers import StableDiffusionControlNetPipeline

    sd = tiny_stable_diffusion_pipeline(seed=0)
    pipe = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        controlnet=[tiny_controlnet(sd.unet, 1), tiny_controlnet(sd.unet, 2)], scheduler=sd.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recording(pipe):
    """Wrap `pipe` so that each call's kwargs are recorded (the wrapper sees exactly what the pipeline gets)."""
    calls = []

    class Recorder:
        def __call__(self, **kwargs):
            calls.append(kwargs)
            return pipe(**kwargs)

    recorder = Recorder()
    recorder.__call__.__func__.__signature__ = __import__("inspect").signature(pipe.__call__)
    recorder.controlnet = pipe.controlnet
    return recorder, calls


def test_multicontrolnet_image_lists_are_per_controlnet_not_per_prompt(multi_controlnet_pipe, embedder):
    # Two ControlNets and two prompts: a per-prompt guess would hand the retry only one ControlNet's image.
    edges = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    kwargs = dict(prompt=PROMPTS, image=edges, num_inference_steps=STEPS, output_type="np")
    plain = multi_controlnet_pipe(generator=generators(range(2)), **kwargs)
    guard = Guard(Blocklist.from_images([plain.images[1]], embedder, threshold=TEST_THRESHOLD), embedder)
    recorder, calls = recording(multi_controlnet_pipe)
    out = GuardedPipeline(recorder, guard)(generator=generators(range(2)), **kwargs)
    assert out.guardrail.attempts == [1, 2]
    retry_images = calls[1]["image"]
    assert len(retry_images) == 2, "one conditioning batch per ControlNet"
    assert all(torch.equal(retry, edge[1:2]) for retry, edge in zip(retry_images, edges)), "the second prompt's row"
    assert np.array_equal(out.images[0], plain.images[0])


def add_tiny_ip_adapter(unet, image_embed_dim=8, seed=0):
    """Load a seeded IP-Adapter (diffusers' own state-dict layout) into `unet`: one image projection, 4 tokens."""
    torch.manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(cross * 4, image_embed_dim) * 0.1, "proj.bias": torch.zeros(cross * 4),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter = {}
    key_id = 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = unet.config.block_out_channels[-1] if name.startswith("mid_block") else None
            if hidden is None:
                blocks = unet.config.block_out_channels
                index = int(name.split(".")[1])
                hidden = (list(reversed(blocks)) if name.startswith("up_blocks") else list(blocks))[index]
            ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.1
            ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.1
            key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_adapter}], low_cpu_mem_usage=False)


def test_ip_adapter_image_embeds_are_sliced_to_the_matched_prompts_rows(embedder):
    pipe = tiny_stable_diffusion_pipeline(seed=0)
    add_tiny_ip_adapter(pipe.unet)
    # [negatives; positives], one row per prompt, as diffusers documents for CFG.
    embeds = [torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(3))]
    kwargs = dict(prompt=PROMPTS, ip_adapter_image_embeds=embeds, num_inference_steps=STEPS, output_type="np",
                  guidance_scale=7.5)
    plain = pipe(generator=generators(range(2)), **kwargs)
    guard = Guard(Blocklist.from_images([plain.images[1]], embedder, threshold=TEST_THRESHOLD), embedder)
    out = GuardedPipeline(pipe, guard)(generator=generators(range(2)), **kwargs)
    assert out.guardrail.attempts == [1, 2], "before the fix the retry failed: 4 embedding rows for 1 prompt"
    assert not any(out.guardrail.matched)
    assert np.array_equal(out.images[0], plain.images[0])


def test_ip_adapter_rows_follow_the_negative_and_positive_halves():
    from guardrail.batching import select_cfg_rows

    embeds = torch.arange(6).view(6, 1, 1).float()  # 3 prompts: negatives 0-2, positives 3-5
    assert select_cfg_rows(embeds, [2, 0], items=3).flatten().tolist() == [2, 0, 5, 3]
    assert select_cfg_rows(embeds[3:], [2], items=3).flatten().tolist() == [5], "no CFG: plain rows"

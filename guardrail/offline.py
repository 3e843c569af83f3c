"""Real model classes with small seeded weights, built with no network: for the demo, examples, tests, benchmarks.

Nothing here fakes a download. The tokenizer is the real CLIP BPE vocabulary that open_clip ships; the models are
real diffusers / open_clip classes built from small configs with seeded random weights. Users with real weights
never need this module.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

_CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write CLIP's `vocab.json` and `merges.txt`, derived from open_clip's bundled BPE file, into `folder`.

    The token ids are CLIP's own (49,408 tokens; 49406/49407 for start/end of text).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as bpe:
        lines = bpe.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice CLIP itself uses
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge.split()) for merge in merges] + list(_CLIP_SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(folder: str | os.PathLike | None = None):  # -> transformers.CLIPTokenizer
    """A real `CLIPTokenizer` with CLIP's vocabulary, built offline (see `write_clip_tokenizer_files`)."""
    from transformers import CLIPTokenizer

    if folder is None:  # the tokenizer reads its files at load time, so a temporary folder will do
        with tempfile.TemporaryDirectory(prefix="guardrail-clip-tokenizer-") as temporary:
            return clip_tokenizer(temporary)
    write_clip_tokenizer_files(folder)
    # transformers 5.x ignores vocab_file=/merges_file= keywords: pass the folder.
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)


_TINY_UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=2,
)
_TINY_VAE = dict(
    block_out_channels=[4, 8],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
    norm_num_groups=2,
)


def tiny_ddpm_pipeline(seed: int = 0):  # -> diffusers.DDPMPipeline
    """A real unconditional `DDPMPipeline` (no prompt, no CFG) of a seeded tiny UNet, 32x32 output."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_stable_diffusion_pipeline(seed: int = 0):  # -> diffusers.StableDiffusionPipeline
    """A real `StableDiffusionPipeline` of seeded tiny components (as diffusers' own tests build), 64x64 output.

    No safety checker. Generating 4 images at 2 steps takes a few tens of milliseconds on CPU.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_TINY_UNET, cross_attention_dim=32)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_TINY_VAE)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=64,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=49408,
        )
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_seeded_open_clip_weights(path: str | os.PathLike, model: str = "ViT-S-32", seed: int = 0) -> Path:
    """Save a seeded, randomly initialized open_clip model to a `.safetensors` weights file.

    Load it back with `OpenCLIPEmbedder(model, pretrained=path)`: the same code path as real local weights.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    clip_model = open_clip.create_model(model, pretrained=None)
    state = {name: tensor.detach().contiguous() for name, tensor in clip_model.state_dict().items()}
    path = Path(path)
    save_file(state, str(path))
    return path


def tiny_stable_diffusion_xl_pipeline(seed: int = 0):  # -> diffusers.StableDiffusionXLPipeline
    """A real `StableDiffusionXLPipeline` of seeded tiny components (two text encoders, CLIP's real tokenizer)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 micro-conditioning values x 8 + the 32-d pooled text embedding
        cross_attention_dim=64,  # the two text encoders' hidden states, concatenated
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_TINY_VAE)
    config = CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=64,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, projection_dim=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    tokenizer = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

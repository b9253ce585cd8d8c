"""A tiny Stable Diffusion XL pipeline built from configs, with random weights.

It has the structure of SDXL base 1.0 (two CLIP text encoders, the second with a projection, whose
penultimate states are side by side; a UNet whose first block has no attention and whose lower two
resolutions cross-attend with several transformer layers per block, taking the pooled text
embedding and the added time ids through ``addition_embed_type="text_time"``; an AutoencoderKL with
SDXL's scaling factor and ``force_upcast``; SDXL's own scheduler config, Euler with "leading"
timestep spacing) at a size that runs in milliseconds on a CPU. Tests use it. Nothing is downloaded:
the tokenizer files are written here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .sd1_tiny import write_tokenizer_files

CLIP_WIDTHS = (16, 24)  # CLIP-L's and OpenCLIP-G's hidden sizes: side by side, the UNet's cross_attention_dim
POOLED_WIDTH = 32  # the second encoder's projection (SDXL: 1280), the pooled ``text_embeds``
TIME_EMBED_WIDTH = 8  # addition_time_embed_dim (SDXL: 256), for each of the 6 time ids

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (the keys Euler does
# not take, such as set_alpha_to_one, are kept in its config and reach DDIM as they do for SDXL)
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _text_config(tokenizer: CLIPTokenizer, width: int, max_length: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,  # the penultimate layer's states are used: two layers reach them
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_sdxl_pipeline(seed: int = 0, max_length: int = 77) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-shaped pipeline: 64x64 images, 8x8x4 latents, cross-attention on
    the 4x4 and 2x2 grids (one and two transformer layers per block), SDXL's Euler scheduler config."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),  # as SDXL's config, this names the heads (head width 8)
        use_linear_projection=True,
        cross_attention_dim=sum(CLIP_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + POOLED_WIDTH,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE
        force_upcast=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer_files(Path(folder), max_length=max_length)
        # the second tokenizer: the same vocabulary, padding with "!" as SDXL's does
        tokenizer_2 = CLIPTokenizer(
            str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), pad_token="!", model_max_length=max_length
        )
    text_encoder = CLIPTextModel(_text_config(tokenizer, CLIP_WIDTHS[0], max_length))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, CLIP_WIDTHS[1], max_length, projection_dim=POOLED_WIDTH)
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,  # as SDXL base's model_index.json
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

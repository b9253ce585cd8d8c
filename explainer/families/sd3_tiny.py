"""A tiny Stable Diffusion 3 pipeline built from configs, with random weights.

It has the structure of SD 3.5 Medium (an MM-DiT with joint attention, a second image-only attention
and QK normalisation in its first block, the last block's text stream cut short; two CLIP text
encoders with projections whose states are padded to the transformer's text width; no T5, so the
pipeline appends zero tokens; an AutoencoderKL with a scaling and a shift factor; flow matching
stepped by Euler with a shift of 3) at a size that runs in milliseconds on a CPU. Tests use it.
Nothing is downloaded: the tokenizer files are written here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .sd1_tiny import write_tokenizer_files

LATENT_CHANNELS = 8
CLIP_WIDTHS = (16, 24)  # CLIP-L's and CLIP-G's hidden sizes (and projections), side by side 40 < the text width
TEXT_WIDTH = 48  # the transformer's joint_attention_dim: the CLIP states are padded to it


def _text_encoder(tokenizer: CLIPTokenizer, width: int, max_length: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            projection_dim=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_sd3_pipeline(seed: int = 0, max_length: int = 77, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3-shaped pipeline: 64x64 images, 8x8x8 latents, 4x4 patches of 2x2."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=sum(CLIP_WIDTHS),
        pos_embed_max_size=8,  # images up to 128x128
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.5,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer_files(Path(folder), max_length=max_length)
        # CLIP-G's tokenizer: the same vocabulary, padding with "!" as SD 3's does
        tokenizer_2 = CLIPTokenizer(
            str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), pad_token="!", model_max_length=max_length
        )
    text_encoder = _text_encoder(tokenizer, CLIP_WIDTHS[0], max_length)
    text_encoder_2 = _text_encoder(tokenizer_2, CLIP_WIDTHS[1], max_length)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""A tiny Stable Diffusion pipeline built from configs, with random weights.

It has the structure of SD v1 (CLIP text encoder and BPE tokenizer, a UNet with self- and
cross-attention at two resolutions, an AutoencoderKL with 4 latent channels) at a size that
runs in milliseconds on a CPU. Tests use it, and the app falls back to it when the embedded
model is missing. Nothing is downloaded: the tokenizer files are written here.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .clip import bytes_to_unicode

# A few whole-word merges so that some words are one token and others split into pieces.
_WORD_MERGES = ("cat", "circle", "red", "dog")


def write_tokenizer_files(folder: Path, max_length: int = 77) -> CLIPTokenizer:
    """Write a byte-level CLIP BPE tokenizer (single characters plus a few word merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in _WORD_MERGES:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: one chain per word
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    return tokenizer


def tiny_pipeline(seed: int = 0, max_length: int = 77) -> StableDiffusionPipeline:
    """A randomly initialised SD-shaped pipeline: 64x64 images, 8x8x4 latents, DPM-Solver++."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
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
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer_files(Path(folder), max_length=max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return sd1_pipeline(unet, vae, text_encoder, tokenizer)


def sd1_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.x pipeline assembled from its parts, with SD's noise schedule stepped by
    DPM-Solver++ and no safety checker (the tiny test model; the benchmarks' SD-shaped one)."""
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

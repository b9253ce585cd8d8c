"""A tiny FLUX.1 pipeline built from configs, with random weights.

It has FLUX.1's structure (a ``FluxTransformer2DModel`` of two double-stream and two single-stream
blocks with rotary position ids over 2x2-packed latents; FLUX.1-schnell's no guidance input, or
FLUX.1-dev's guidance embedding; CLIP's pooled output and T5's tokens with a sentencepiece-style
tokenizer; an AutoencoderKL with a scaling and a shift factor and no quant convs; flow matching stepped
by Euler with FLUX.1-dev's resolution-dependent shift, or FLUX.1-schnell's none) at a size that runs in
milliseconds on a CPU. Tests use it. Nothing is downloaded: CLIP's tokenizer files are written by ``tiny``,
T5's tokenizer is built here.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from .tiny import clip_text_config, make_shifted_vae, make_tokenizer, quiet

LATENT_CHANNELS = 4  # the transformer takes them packed: 16 channels per token
CLIP_WIDTH = 16  # CLIP's hidden size: the pooled projection's width
T5_WIDTH = 24  # T5's d_model: the transformer's joint_attention_dim
T5_MAX_LENGTH = 16

# T5's vocabulary: sentencepiece pieces with log-probabilities. Whole words begin with "▁"; "circle" and
# "bicycle" have none and split into pieces; single letters (with and without "▁"), digits and
# punctuation spell anything else; characters outside it become <unk>.
_WHOLE_WORDS = ("a", "an", "the", "cat", "dog", "on", "in", "and", "of", "red", "blue", "green", "photo", "playing", "soccer")
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PUNCTUATION = ",.!?'-"


def t5_vocabulary() -> list[tuple[str, float]]:
    """(piece, score) pairs in T5's order: <pad> 0, </s> 1, <unk> 2, then the pieces."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -2.0) for word in _WHOLE_WORDS]
    pieces += [("▁cir", -3.0), ("cle", -3.0), ("▁bicy", -3.0)]
    pieces += [(char, -4.0) for char in _PUNCTUATION] + [(str(digit), -5.0) for digit in range(10)]
    pieces += [("▁" + letter, -6.0) for letter in _LETTERS] + [(letter, -7.0) for letter in _LETTERS]
    return pieces


def t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A fast T5 tokenizer (a Unigram model over ``t5_vocabulary``, T5's whitespace and "▁" pre-tokenizer,
    ``</s>`` appended, ``<pad>`` padding), built in memory."""
    return T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0, model_max_length=max_length)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False, dynamic_shift: bool = True) -> FluxPipeline:
    """A randomly initialised FLUX-shaped pipeline: 64x64 images, 8x8x4 latents, 4x4 packed tokens.

    ``guidance_embeds``: FLUX.1-dev's guidance input (False: FLUX.1-schnell's none). ``dynamic_shift``:
    FLUX.1-dev's scheduler (mu from the image's token count, base shift 0.5 to max shift 1.15); False:
    FLUX.1-schnell's (a static shift of 1, no shift at all).
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),  # the rotary dimensions of (0, row, column): they sum to the head size
    )
    vae = make_shifted_vae(LATENT_CHANNELS)
    tokenizer = make_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, CLIP_WIDTH, projection_dim=CLIP_WIDTH))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=2 * T5_WIDTH,
            num_layers=2,
            num_heads=3,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",  # T5 v1.1's, as FLUX's encoder
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    ).eval()
    shift = dict(use_dynamic_shifting=True, shift=3.0) if dynamic_shift else dict(use_dynamic_shifting=False, shift=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, **shift
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return quiet(pipe)

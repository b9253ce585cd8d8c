"""The parts every tiny random-weight pipeline shares: the byte-level CLIP tokenizer (written here, so
nothing is downloaded), CLIP text encoder configs and a 64x64 VAE.

The builders only construct: each *_tiny module seeds torch once and calls them in its own order,
so the random initialisation (and every weight) stays what that module has always made.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer

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


def make_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The tiny CLIP tokenizer; its files live only while it reads them."""
    with tempfile.TemporaryDirectory() as folder:
        return write_tokenizer_files(Path(folder), max_length=max_length)


def make_tokenizer_pair(max_length: int = 77) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """CLIP-L's and CLIP-G's tokenizers: one vocabulary, the second padding with "!" as SD 3's and SDXL's do."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer_files(Path(folder), max_length=max_length)
        tokenizer_2 = CLIPTokenizer(
            str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), pad_token="!", model_max_length=max_length
        )
    return tokenizer, tokenizer_2


def clip_text_config(tokenizer: CLIPTokenizer, width: int, layers: int = 2, heads: int = 2, **extra) -> CLIPTextConfig:
    """A CLIP text encoder of ``width`` for ``tokenizer`` (its vocabulary, special tokens and length)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def make_vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    """An AutoencoderKL of four 16-channel levels: 64x64 images to 8x8 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def make_shifted_vae(latent_channels: int) -> AutoencoderKL:
    """The VAE as SD 3's and FLUX's are made: a scaling and a shift factor, no quant convs."""
    return make_vae(
        latent_channels, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False
    )


def quiet(pipe):
    """The pipeline, its progress bar turned off."""
    pipe.set_progress_bar_config(disable=True)
    return pipe

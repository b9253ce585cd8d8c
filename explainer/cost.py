"""What a model's GPU work costs: floating-point operations of one denoiser evaluation and of one VAE
decode at any picture size, counted by PyTorch's ``FlopCounterMode`` on modules built on the meta
device (no weights, no memory, a few seconds on a CPU).

The count covers what the counter knows (matrix products, convolutions, attention), which is where
the time goes; the ZeroGPU durations (``ui.settings.gpu_seconds``) turn it into seconds with a
throughput anchored to a published timing counted the same way (docs/design.md, "ZeroGPU durations").

A Hub model's architecture is its denoiser's and VAE's ``config.json`` (``HUB_ARCHITECTURES``: the
structural keys, as the Hub repositories hold them); a local model's is read from the loaded model.

    >>> cost = step_cost("stabilityai/stable-diffusion-xl-base-1.0")
    >>> round(cost.denoiser(1024, 1024), 1), round(cost.decode(1024, 1024), 1)  # TFLOP
    (6.8, 10.5)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import config

# The structural keys of each Hub model's transformer/unet and vae config.json (what sets the work).
_SD_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "latent_channels": 4}
_MMDIT_VAE = _SD_VAE | {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
_SD1_UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
             "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}

HUB_ARCHITECTURES: dict[str, dict[str, dict]] = {
    "CompVis/stable-diffusion-v1-4": {"denoiser": _SD1_UNET, "vae": _SD_VAE},
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {"denoiser": _SD1_UNET, "vae": _SD_VAE},
    "stabilityai/stable-diffusion-xl-base-1.0": {
        "denoiser": {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                     "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                     "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True},
        "vae": _SD_VAE,
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        "denoiser": {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
                     "out_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
                     "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
                     "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"},
        "vae": _MMDIT_VAE,
    },
    "black-forest-labs/FLUX.1-schnell": {
        "denoiser": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "num_attention_heads": 24,
                     "num_layers": 19, "num_single_layers": 38, "in_channels": 64, "joint_attention_dim": 4096,
                     "pooled_projection_dim": 768, "patch_size": 1, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]},
        "vae": _MMDIT_VAE,
    },
}

# A model's cost is counted at these fractions of its default side and fitted by a quadratic in the
# pixel count, which is exact for these architectures: convolutions, projections and cross-attention
# grow with the pixels, self- and joint attention with their square, the text-only part not at all.
_FIT_SCALES = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class StepCost:
    """TFLOP of one denoiser evaluation (one image, one guidance half) and of one VAE decode, as
    quadratics in the picture's pixels (coefficients of 1, pixels, pixels², pixels in megapixels), and
    the VAE's scale (picture pixels per latent pixel, per side)."""

    denoiser_fit: tuple[float, float, float]
    decode_fit: tuple[float, float, float]
    scale: int

    def denoiser(self, width: int, height: int) -> float:
        return _evaluate(self.denoiser_fit, width, height)

    def decode(self, width: int, height: int) -> float:
        return _evaluate(self.decode_fit, width, height)


def _evaluate(fit: tuple[float, float, float], width: int, height: int) -> float:
    pixels = width * height / 1e6
    return max(0.0, fit[0] + fit[1] * pixels + fit[2] * pixels**2)


@functools.cache
def step_cost(model_id: str) -> StepCost:
    """The counted cost of model ``model_id`` at any size (cached: a few seconds for the largest, once)."""
    spec = config.model_spec(model_id)
    sides = [(_rounded(spec.width * scale), _rounded(spec.height * scale)) for scale in _FIT_SCALES]
    counts = [count_tflops(model_id, width, height) for width, height in sides]
    megapixels = [width * height / 1e6 for width, height in sides]
    denoiser_fit = _quadratic(megapixels, [denoiser for denoiser, _ in counts])
    decode_fit = _quadratic(megapixels, [decode for _, decode in counts])
    return StepCost(denoiser_fit, decode_fit, _modules(model_id)[2])


def count_tflops(model_id: str, width: int, height: int) -> tuple[float, float]:
    """(TFLOP of one denoiser evaluation, of one VAE decode) of model ``model_id`` at ``width`` x ``height``."""
    spec = config.model_spec(model_id)
    denoiser, vae, scale = _modules(model_id)
    latent_size = (height // scale, width // scale)
    with torch.device("meta"):
        inputs = _family(spec).example_inputs(denoiser, latent_size, spec.max_sequence_length)
        latents = torch.zeros(1, vae.config.latent_channels, *latent_size)
    return _tflops(lambda: denoiser(**inputs, return_dict=False)), _tflops(lambda: vae.decode(latents, return_dict=False))


@functools.cache
def _modules(model_id: str) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """The model's denoiser and VAE on the meta device, and the VAE's scale."""
    denoiser_config, vae_config = architecture(config.model_spec(model_id))
    with torch.device("meta"):
        denoiser, vae = _built(denoiser_config), _built(vae_config)
    return denoiser, vae, 2 ** (len(vae.config.block_out_channels) - 1)


def architecture(spec: config.ModelSpec) -> tuple[dict, dict]:
    """(denoiser config, VAE config) of a model: stored for a Hub model, read from the loaded model otherwise."""
    if spec.hub:
        if spec.id not in HUB_ARCHITECTURES:
            raise ValueError(f"{spec.id} has no architecture in explainer/cost.py: add its denoiser's and VAE's "
                             "config.json there, so its GPU work can be counted.")
        stored = HUB_ARCHITECTURES[spec.id]
        return stored["denoiser"], stored["vae"]
    from .models import load_model  # a local model is small: load it and read its configs

    model = load_model(spec.id)
    return _config_of(model.denoiser), _config_of(model.pipe.vae)


def _config_of(module: torch.nn.Module) -> dict:
    return dict(module.config) | {"_class_name": type(module).__name__}


def _family(spec: config.ModelSpec):
    from .families import family

    return family(spec.family)


def _built(module_config: dict) -> torch.nn.Module:
    module_class = getattr(diffusers, module_config["_class_name"])
    return module_class.from_config({key: value for key, value in module_config.items() if not key.startswith("_")}).eval()


def _rounded(side: float, multiple: int = 16) -> int:
    return max(multiple, int(round(side / multiple)) * multiple)


def _tflops(call) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() / 1e12


def _quadratic(x: list[float], y: list[float]) -> tuple[float, float, float]:
    coefficients = np.polyfit(np.asarray(x), np.asarray(y), 2)  # highest power first
    return float(coefficients[2]), float(coefficients[1]), float(coefficients[0])

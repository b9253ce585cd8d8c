"""Stable Diffusion XL: SD 1.x's design grown. A UNet with cross-attention at its two lower
resolutions (several transformer layers per block; its first resolution has none) to two CLIP text
encoders' penultimate hidden states side by side, plus an added embedding of the second encoder's
pooled projection and six time ids (original size, crop top-left, target size); a VAE with a
scaling factor that overflows in float16 (``force_upcast``); a DDPM noise schedule stepped by
DDIM or DPM-Solver++ as for SD 1.x.

What the UNet shares with SD 1.x (attention sites and groups, the explicit attention, DF-CAM's
layers, the noise levels, estimates and steps, the first text encoder's attention) is
``StableDiffusion1``'s; this adapter answers what SDXL changes: loading, encoding, the denoiser
call, decoding and rebuilding the conditional text from token ids.
"""

from __future__ import annotations

import threading

import torch
from diffusers import StableDiffusionXLPipeline

from .base import Conditioning
from .preview import fit_linear_preview
from .sd1 import StableDiffusion1

_TEXT = "encoder_hidden_states"  # (halves, L, D_1 + D_2): both encoders' penultimate states side by side
_POOLED = "text_embeds"  # (halves, P): the second encoder's pooled projection
_CROP_TOP_LEFT = (0, 0)  # the pipeline's default crop coordinates
_UPCAST_LOCK = threading.Lock()


def added_time_ids(pipe, height: int, width: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL's six added time ids (batch, 6) for a ``width`` x ``height`` picture, as the pipeline builds
    them by default: original size = target size = (height, width), crop top-left (0, 0), the same
    in every row (both guidance halves). A ValueError if the UNet's added embedding does not take
    six time ids plus the pooled projection (a wrong config, as the pipeline checks)."""
    unet = pipe.unet
    ids = [height, width, *_CROP_TOP_LEFT, height, width]
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * len(ids) + pipe.text_encoder_2.config.projection_dim
    if passed != expected:
        raise ValueError(f"The UNet expects an added embedding of {expected} values, but the time ids and the "
                         f"pooled projection make {passed}: check the UNet's and the second text encoder's configs.")
    return torch.tensor([ids], dtype=dtype, device=device).repeat(batch, 1)


def decoding_vae(pipe):
    """The pipeline's VAE, ready to decode: moved to float32 once, and kept there, where it is float16
    and its config says ``force_upcast`` (SDXL's VAE overflows in float16). The pipeline upcasts for
    each decode and casts back; casting back while another run decodes on the shared VAE would
    break that run, so the VAE stays float32 (SDXL's: about 170 MB more). The check holds a lock so
    that no thread decodes while another is halfway through the cast."""
    vae = pipe.vae
    with _UPCAST_LOCK:
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(dtype=torch.float32)
    return vae


def vae_input(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the denoiser's scale as the decoder takes them, as the pipeline unscales them:
    ``z * std / scaling_factor + mean`` where the VAE's config has latent means and deviations,
    else ``z / scaling_factor`` (SDXL base)."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return latents / vae.config.scaling_factor
    per_channel = (1, len(mean), 1, 1)
    mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(per_channel)
    std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(per_channel)
    return latents * std / vae.config.scaling_factor + mean


class StableDiffusionXL(StableDiffusion1):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    architecture = "UNet"

    # --- loading and shapes
    def load(self, source, device, dtype, local_files_only):
        """The pipeline (never remote code, no watermarker: the explainer decodes itself), its VAE
        upcast at once where ``force_upcast`` asks for it (``decoding_vae``)."""
        pipe = StableDiffusionXLPipeline.from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only, use_safetensors=True, add_watermarker=False,
        )
        pipe = pipe.to(device)
        decoding_vae(pipe)
        return pipe

    def latent_size(self, pipe, width, height):
        """(H_lat, W_lat); a ValueError unless the sides are whole latent pixels (the time ids name the
        picture's size, which the latent's must give back exactly)."""
        factor = pipe.vae_scale_factor
        if width % factor or height % factor:
            raise ValueError(f"width and height must be multiples of {factor} for this model, got {width}x{height}.")
        return height // factor, width // factor

    def example_inputs(self, denoiser, latent_size, max_sequence_length=None):
        """SD 1.x's, with the pooled text embedding and the six time ids (``addition_embed_type="text_time"``)."""
        unet = denoiser.config
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        added = {_POOLED: torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        return super().example_inputs(denoiser, latent_size) | {"added_cond_kwargs": added}

    def rebuilt(self, pipe, denoiser):
        return type(pipe)(
            **{**pipe.components, "unet": denoiser},
            force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )

    # --- text: the prompt's tokens are the first encoder's (CLIP-L); the second's are the same words
    def encode(self, pipe, prompt, negative_prompt, guided, max_sequence_length=None):
        """As the pipeline's ``encode_prompt``: both encoders' penultimate states side by side and the
        second's pooled projection. An empty negative prompt under guidance gives zeros where the
        pipeline's ``force_zeros_for_empty_prompt`` says so (SDXL base), else the encoded "".
        The added time ids depend on the picture's size, not the text: ``predict`` adds them."""
        text, negative_text, pooled, negative_pooled = pipe.encode_prompt(
            prompt, None, device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
        )
        if not guided:
            return Conditioning({_TEXT: text, _POOLED: pooled})
        return Conditioning({_TEXT: torch.cat([negative_text, text]), _POOLED: torch.cat([negative_pooled, pooled])})

    # --- denoising
    def predict(self, pipe, latent_input, timestep, conditioning, recorder=None):
        """The UNet's output; the pooled projection and the added time ids of a picture of the latent's
        size go in through ``added_cond_kwargs``, as the pipeline passes them."""
        text, pooled = conditioning.tensors[_TEXT], conditioning.tensors[_POOLED]
        factor = pipe.vae_scale_factor
        height, width = latent_input.shape[-2] * factor, latent_input.shape[-1] * factor
        time_ids = added_time_ids(pipe, height, width, latent_input.shape[0], text.dtype, latent_input.device)
        kwargs = {} if recorder is None else {"cross_attention_kwargs": {"recorder": recorder}}
        return pipe.unet(
            latent_input, timestep, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False, **kwargs,
        )[0]

    # --- pictures
    def decode(self, pipe, latents, output_type="pil"):
        vae = decoding_vae(pipe)
        with torch.inference_mode():
            pictures = vae.decode(vae_input(vae, latents.to(device=vae.device, dtype=vae.dtype))).sample
        return pipe.image_processor.postprocess(pictures.float(), output_type=output_type, do_denormalize=[True] * len(pictures))

    def encode_pictures(self, pipe, pixels):
        """The inverse of ``vae_input`` on the posterior's mode, with the VAE ``decode`` uses (float32 where
        it must be)."""
        vae = decoding_vae(pipe)
        with torch.inference_mode():
            z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is None or std is None:
            return z * vae.config.scaling_factor
        per_channel = (1, len(mean), 1, 1)
        mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(per_channel)
        std = torch.tensor(std, device=z.device, dtype=z.dtype).view(per_channel)
        return (z - mean) * vae.config.scaling_factor / std

    def fit_preview(self, pipe):
        vae = decoding_vae(pipe)
        return fit_linear_preview(vae, lambda latents: vae_input(vae, latents))

    # --- token relevance
    def encode_ids(self, pipe, ids, conditioning):
        """The first encoder's part of the conditional half rebuilt from ``ids``: its penultimate states
        in the first columns of the text; the second encoder's columns and the pooled projection (the
        second encoder's alone) as ``conditioning`` holds them."""
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # (1, L, D_1)
        text = conditioning.tensors[_TEXT][-1:]
        rebuilt = torch.cat([states.to(text.dtype), text[..., states.shape[-1]:]], dim=-1)
        return conditioning.with_conditional(_TEXT, rebuilt)


__all__ = ["StableDiffusionXL", "added_time_ids", "decoding_vae", "vae_input"]

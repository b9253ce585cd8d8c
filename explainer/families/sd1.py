"""Stable Diffusion 1.x (and the embedded shapes model, built the same way): a UNet with
cross-attention to one CLIP text encoder's last hidden state, a VAE with a scaling factor, and a
DDPM noise schedule stepped by DDIM or DPM-Solver++."""

from __future__ import annotations

import math

import re

import torch
from diffusers import StableDiffusionPipeline

from ..capture import classic_attention
from . import clip, ddpm
from .base import Conditioning, Family
from .preview import fit_linear_preview

_TEXT = "encoder_hidden_states"
_PROCESSOR_SUFFIX = ".processor"
# DF-CAM's layers: each resnet, attention block and resampler of every down, mid and up block
_CAM_PARTS = ("resnets", "attentions", "downsamplers", "upsamplers")
_CAM_LAYER = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(" + "|".join(_CAM_PARTS) + r")\.\d+$")


class StableDiffusion1(Family):
    name = "sd1"
    pipeline_class = "StableDiffusionPipeline"
    architecture = "UNet"

    def load(self, source, device, dtype, local_files_only):
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=local_files_only, use_safetensors=True,
        )
        return pipe.to(device)

    def denoiser(self, pipe):
        return pipe.unet

    def latent_channels(self, pipe):
        return pipe.unet.config.in_channels

    def latent_size(self, pipe, width, height):
        factor = pipe.vae_scale_factor
        return height // factor, width // factor

    def rebuilt(self, pipe, denoiser):
        return type(pipe)(**{**pipe.components, "unet": denoiser})

    def example_inputs(self, denoiser, latent_size, max_sequence_length=None):  # CLIP's tokens: the length does not apply
        unet = denoiser.config
        return {"sample": torch.zeros(1, unet.in_channels, *latent_size), "timestep": torch.ones(1),
                "encoder_hidden_states": torch.zeros(1, clip.TOKENS, unet.cross_attention_dim)}

    def tokenize(self, pipe, prompt, max_sequence_length=None):  # CLIP's 77 tokens: the length does not apply
        return clip.tokenize(pipe.tokenizer, prompt)

    def vocabulary(self, pipe):
        return clip.whole_words(pipe.tokenizer)

    def encode(self, pipe, prompt, negative_prompt, guided, max_sequence_length=None):
        positive, negative = pipe.encode_prompt(
            prompt, pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
        )
        return Conditioning({_TEXT: torch.cat([negative, positive]) if guided else positive})

    def scheduler(self, pipe, settings):
        return ddpm.make_scheduler(pipe.scheduler.config, settings, pipe.unet.device)

    def noise_levels(self, scheduler, timestep):
        alpha_bar = ddpm.alpha_bar(scheduler, timestep)
        return alpha_bar, ddpm.noise_level(alpha_bar)

    def predict(self, pipe, latent_input, timestep, conditioning, recorder=None):
        kwargs = {} if recorder is None else {"cross_attention_kwargs": {"recorder": recorder}}
        return pipe.unet(latent_input, timestep, **conditioning.tensors, return_dict=False, **kwargs)[0]

    def clean_estimate(self, scheduler, latents, output, timestep):
        alpha_bar = ddpm.alpha_bar(scheduler, timestep)
        return ddpm.predicted_original(latents.float(), output.float(), alpha_bar, scheduler.config.prediction_type)

    def noise_estimate(self, scheduler, latents, output, timestep):
        alpha_bar = ddpm.alpha_bar(scheduler, timestep)
        return ddpm.predicted_noise(latents.float(), output.float(), alpha_bar, scheduler.config.prediction_type)

    def noised(self, scheduler, clean, noise, timestep):
        alpha_bar = ddpm.alpha_bar(scheduler, timestep)
        return math.sqrt(alpha_bar) * clean.float() + math.sqrt(1 - alpha_bar) * noise.float()

    def replay_step(self, scheduler, latents, output, timestep, next_timestep):
        # first order: a multistep solver's history is not replayed, so for DPM-Solver++ (order 2)
        # this differs slightly from the run's own step after the first step
        alpha_bar, next_alpha_bar = ddpm.alpha_bar(scheduler, timestep), ddpm.alpha_bar(scheduler, next_timestep)
        return ddpm.ddim_step(latents, output, alpha_bar, next_alpha_bar, scheduler.config.prediction_type).to(latents.dtype)

    def decode(self, pipe, latents, output_type="pil"):
        vae = pipe.vae
        with torch.inference_mode():
            pictures = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(pictures.float(), output_type=output_type, do_denormalize=[True] * len(pictures))

    def encode_pictures(self, pipe, pixels):
        vae = pipe.vae
        with torch.inference_mode():
            posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.mode() * vae.config.scaling_factor

    def fit_preview(self, pipe):
        return fit_linear_preview(pipe.vae, lambda latents: latents / pipe.vae.config.scaling_factor)

    def cross_attention_sites(self, denoiser):
        return [
            key for key in denoiser.attn_processors
            if getattr(denoiser.get_submodule(key.removesuffix(_PROCESSOR_SUFFIX)), "is_cross_attention", False)
        ]

    def attention_modules(self, denoiser):
        return [denoiser.get_submodule(key.removesuffix(_PROCESSOR_SUFFIX)) for key in denoiser.attn_processors]

    def layer_grid(self, tokens, latent_size):
        """The latent grid halved k times (rounding up), as the UNet's down blocks do."""
        height, width = latent_size
        while height * width > tokens and (height > 1 or width > 1):
            height, width = -(-height // 2), -(-width // 2)
        if height * width != tokens:
            raise ValueError(f"Cannot place {tokens} image tokens on a grid derived from latent size {latent_size}.")
        return height, width

    def layer_group(self, site, grid, sites=()):
        block = site.split(".", 1)[0].removesuffix("_blocks").removesuffix("_block")  # down, mid, up
        return f"{block} {grid[0]}×{grid[1]}"

    def explicit_attention(self, module, hidden_states, encoder_hidden_states, attention_mask, temb, on_probs):
        kind = "self" if encoder_hidden_states is None else "cross"
        return classic_attention(module, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 on_probs=lambda probs: on_probs(probs, kind))

    def explained_layers(self, denoiser):
        return [name for name, _ in denoiser.named_modules() if _CAM_LAYER.match(name)]

    def explained_output(self, output):
        """A resnet or sampler returns the feature map; a Transformer2DModel a tuple or an output object."""
        if isinstance(output, tuple):
            return output[0]
        return getattr(output, "sample", output)

    def text_attention_modules(self, pipe):
        return clip.text_attention_modules(pipe.text_encoder)

    def text_attention(self, module, hidden_states, attention_mask):
        return clip.text_attention(module, hidden_states, attention_mask)

    def encode_ids(self, pipe, ids, conditioning):
        return conditioning.with_conditional(_TEXT, pipe.text_encoder(ids)[0].to(pipe.unet.dtype))

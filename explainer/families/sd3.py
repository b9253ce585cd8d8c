"""Stable Diffusion 3 / 3.5: an MM-DiT (``SD3Transformer2DModel``) whose blocks attend jointly over
[image tokens; text tokens], conditioned on two CLIP text encoders (and T5, optional), trained by
flow matching (x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0) and stepped by
Euler (``FlowMatchEulerDiscreteScheduler``), a VAE with a scaling and a shift factor."""

from __future__ import annotations

import re

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from ..capture import joint_attention
from ..schedules import flow_sigmas
from . import clip
from .base import Conditioning, Family
from .preview import fit_linear_preview

_TEXT = "encoder_hidden_states"
_POOLED = "pooled_projections"
_PROCESSOR_SUFFIX = ".processor"
_PIPELINE_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)$")
_SITE_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def image_sequence_shift(image_tokens: int, config) -> float:
    """mu of a resolution-dependent shift: linear in the image's token count, from ``base_shift`` at
    ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len`` (as the SD 3 pipeline
    computes it; its fallback for a missing ``max_shift`` is 1.16)."""
    base_length, max_length = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_length - base_length)
    return base_shift + slope * (image_tokens - base_length)


def sigma_at(scheduler, timestep) -> torch.Tensor:
    """sigma at one of the scheduler's timesteps, as the scheduler holds it (a float32 0-d tensor on
    its device); 0 for ``None``, the clean latent after the last step."""
    if timestep is None:
        return torch.zeros((), dtype=scheduler.sigmas.dtype, device=scheduler.sigmas.device)
    found = (scheduler.timesteps == timestep).nonzero()
    if len(found) == 0:
        raise ValueError(f"Timestep {timestep} is not one of this run's ({scheduler.timesteps.tolist()}).")
    return scheduler.sigmas[found[0, 0]]


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    architecture = "MM-DiT"

    def load(self, source, device, dtype, local_files_only):
        """The pipeline; a text encoder the pipeline's index leaves out (no T5, as the embedded model)
        is passed as None, which diffusers asks for explicitly."""
        index = StableDiffusion3Pipeline.load_config(source, local_files_only=local_files_only)
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if (index.get(name) or [None])[0] is None}
        pipe = StableDiffusion3Pipeline.from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only, use_safetensors=True, **absent
        )
        return pipe.to(device)

    def denoiser(self, pipe):
        return pipe.transformer

    def latent_channels(self, pipe):
        return pipe.transformer.config.in_channels

    def latent_size(self, pipe, width, height):
        """(H_lat, W_lat); a ValueError unless the latent is whole patches and its patch grid fits the
        transformer's position embeddings."""
        factor, patch = pipe.vae_scale_factor, pipe.transformer.config.patch_size
        if width % (factor * patch) or height % (factor * patch):
            raise ValueError(f"width and height must be multiples of {factor * patch} for this model, got {width}x{height}.")
        largest = pipe.transformer.config.pos_embed_max_size
        if largest is not None and max(width, height) > largest * factor * patch:
            raise ValueError(f"width and height must be at most {largest * factor * patch} for this model, got {width}x{height}.")
        return height // factor, width // factor

    def rebuilt(self, pipe, denoiser):
        return type(pipe)(**{**pipe.components, "transformer": denoiser})

    def example_inputs(self, denoiser, latent_size, max_sequence_length=None):
        """CLIP's tokens then T5's (``max_sequence_length``, the pipeline's 256 by default) and the pooled projection."""
        transformer = denoiser.config
        tokens = clip.TOKENS + (max_sequence_length or _PIPELINE_MAX_SEQUENCE_LENGTH)
        return {"hidden_states": torch.zeros(1, transformer.in_channels, *latent_size), "timestep": torch.ones(1),
                "encoder_hidden_states": torch.zeros(1, tokens, transformer.joint_attention_dim),
                "pooled_projections": torch.zeros(1, transformer.pooled_projection_dim)}

    # --- text: the prompt's tokens are CLIP-L's (the first encoder); CLIP-G's are the same words
    def tokenize(self, pipe, prompt, max_sequence_length=None):  # CLIP's 77 tokens: the length does not apply
        return clip.tokenize(pipe.tokenizer, prompt)

    def vocabulary(self, pipe):
        return clip.whole_words(pipe.tokenizer)

    def encode(self, pipe, prompt, negative_prompt, guided, max_sequence_length=None):
        """Both CLIP encoders' penultimate states side by side, padded to the transformer's text width,
        then T5's tokens (zeros of ``max_sequence_length`` tokens without T5); the pooled projection is
        both CLIP encoders' pooled outputs side by side."""
        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        text, negative_text, pooled, negative_pooled = pipe.encode_prompt(
            prompt, None, None, device=pipe.transformer.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guided, negative_prompt=negative_prompt or None, **length,
        )
        if not guided:
            return Conditioning({_TEXT: text, _POOLED: pooled})
        return Conditioning({_TEXT: torch.cat([negative_text, text]), _POOLED: torch.cat([negative_pooled, pooled])})

    # --- denoising: flow matching
    def scheduler(self, pipe, settings):
        """The pipeline's Euler scheduler on the run's sigmas: uniform as the pipeline spaces them, early
        and latter (and explicit lists) from ``schedules.flow_sigmas``; the model's shift (static, or
        resolution-dependent with mu as the pipeline computes it) applies to both. ``settings.scheduler``
        does not apply: flow matching is stepped by Euler."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        options = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            height, width = self.latent_size(pipe, settings.width, settings.height)
            patch = pipe.transformer.config.patch_size
            options["mu"] = image_sequence_shift((height // patch) * (width // patch), scheduler.config)
        device = pipe.transformer.device
        sigmas = flow_sigmas(settings.schedule, settings.steps, settings.concentration, scheduler.config.num_train_timesteps)
        if sigmas is None:
            scheduler.set_timesteps(settings.steps, device=device, **options)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, **options)
        return scheduler

    def noise_levels(self, scheduler, timestep):
        sigma = float(sigma_at(scheduler, timestep))
        return (1 - sigma) ** 2, sigma

    def predict(self, pipe, latent_input, timestep, conditioning, recorder=None):
        timestep = torch.as_tensor(timestep, device=latent_input.device).expand(latent_input.shape[0])
        return pipe.transformer(
            hidden_states=latent_input, timestep=timestep, **conditioning.tensors,
            joint_attention_kwargs=None if recorder is None else {"recorder": recorder}, return_dict=False,
        )[0]

    def clean_estimate(self, scheduler, latents, output, timestep):
        """x0_hat = x_sigma - sigma v."""
        sigma = sigma_at(scheduler, timestep).to(latents.device)
        return latents.float() - sigma * output.float()

    def noise_estimate(self, scheduler, latents, output, timestep):
        """eps_hat = x_sigma + (1 - sigma) v."""
        sigma = sigma_at(scheduler, timestep).to(latents.device)
        return latents.float() + (1 - sigma) * output.float()

    def noised(self, scheduler, clean, noise, timestep):
        sigma = sigma_at(scheduler, timestep).to(clean.device)
        return (1 - sigma) * clean.float() + sigma * noise.float()

    def replay_step(self, scheduler, latents, output, timestep, next_timestep):
        """Euler, the run's own step: x_next = x_sigma + (sigma_next - sigma) v, in float32."""
        step = (sigma_at(scheduler, next_timestep) - sigma_at(scheduler, timestep)).to(latents.device)
        return (latents.float() + step * output.float()).to(latents.dtype)

    # --- pictures
    def decode(self, pipe, latents, output_type="pil"):
        vae = pipe.vae
        with torch.inference_mode():
            pictures = vae.decode(_vae_input(vae, latents.to(device=vae.device, dtype=vae.dtype))).sample
        return pipe.image_processor.postprocess(pictures.float(), output_type=output_type, do_denormalize=[True] * len(pictures))

    def encode_pictures(self, pipe, pixels):
        """(z - shift_factor) * scaling_factor of the posterior's mode, the inverse of ``decode``."""
        vae = pipe.vae
        with torch.inference_mode():
            posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return (posterior.mode() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def fit_preview(self, pipe):
        return fit_linear_preview(pipe.vae, lambda latents: _vae_input(pipe.vae, latents))

    # --- attention and layers
    def cross_attention_sites(self, denoiser):
        """The joint attention of every transformer block (the module that projects the text itself)."""
        return [
            key for key in denoiser.attn_processors
            if getattr(denoiser.get_submodule(key.removesuffix(_PROCESSOR_SUFFIX)), "add_q_proj", None) is not None
        ]

    def attention_modules(self, denoiser):
        return [denoiser.get_submodule(key.removesuffix(_PROCESSOR_SUFFIX)) for key in denoiser.attn_processors]

    def layer_grid(self, tokens, latent_size):
        """The patch grid: the latent grid divided by the patch size that gives ``tokens`` image tokens."""
        height, width = latent_size
        for patch in range(1, min(height, width) + 1):
            if height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) == tokens:
                return height // patch, width // patch
        raise ValueError(f"Cannot place {tokens} image tokens on a patch grid of latent size {latent_size}.")

    def layer_group(self, site, grid, sites=()):
        """The blocks in the same third of the depth (early, middle, late), e.g. "blocks 0–7"."""
        if site not in sites:
            raise ValueError(f"{site!r} is not among the sites {list(sites)}: an MM-DiT's groups need them all.")
        third = _third(sites.index(site), len(sites))
        members = [_block(other) for index, other in enumerate(sites) if _third(index, len(sites)) == third]
        return f"blocks {members[0]}–{members[-1]}" if len(members) > 1 else f"block {members[0]}"

    def explicit_attention(self, module, hidden_states, encoder_hidden_states, attention_mask, temb, on_probs):
        kind = "self" if encoder_hidden_states is None else "joint"
        return joint_attention(module, hidden_states, encoder_hidden_states, on_probs=lambda probs: on_probs(probs, kind))

    def explained_layers(self, denoiser):
        """Every transformer block, in forward order."""
        return [name for name, _ in denoiser.named_modules() if _BLOCK.match(name)]

    def explained_output(self, output):
        """A block returns (text tokens, image tokens); the image tokens (B, N, C)."""
        return output[1]

    def text_attention_modules(self, pipe):
        return clip.text_attention_modules(pipe.text_encoder)

    def text_attention(self, module, hidden_states, attention_mask):
        return clip.text_attention(module, hidden_states, attention_mask)

    def encode_ids(self, pipe, ids, conditioning):
        """CLIP-L's part of the conditional half rebuilt from ``ids``: its penultimate states in the
        first columns of the CLIP positions, its pooled output in the first columns of the pooled
        projection; CLIP-G's part, the padding and T5's tokens as ``conditioning`` holds them."""
        encoded = pipe.text_encoder(ids, output_hidden_states=True)
        states, pooled_output = encoded.hidden_states[-2], encoded[0]  # (1, L, D_L), (1, P_L)
        text, pooled = conditioning.tensors[_TEXT][-1:], conditioning.tensors[_POOLED][-1:]
        length, width = states.shape[1:]
        clip_positions = torch.cat([states.to(text.dtype), text[:, :length, width:]], dim=-1)
        rebuilt_text = torch.cat([clip_positions, text[:, length:]], dim=1)
        rebuilt_pooled = torch.cat([pooled_output.to(pooled.dtype), pooled[:, pooled_output.shape[-1]:]], dim=-1)
        return conditioning.with_conditional(_TEXT, rebuilt_text).with_conditional(_POOLED, rebuilt_pooled)


def _vae_input(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the denoiser's scale as the decoder takes them: z / scaling_factor + shift_factor."""
    return latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)


def _third(index: int, count: int) -> int:
    return index * 3 // count


def _block(site: str) -> int:
    return int(_SITE_BLOCK.match(site).group(1))


__all__ = ["StableDiffusion3", "image_sequence_shift", "sigma_at"]

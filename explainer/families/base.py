"""The seam between the explainer and a model family: one adapter class per family.

A family adapter answers every question the run, the methods and the views ask of a model: how to
load it, encode a prompt, call the denoiser once, turn its output into a clean-latent estimate,
take a step, decode latents, where its attention sites are and which layers DF-CAM explains. The
rest of the library asks the adapter (``model.family``) and names no UNet block, text encoder or
noise-schedule table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """The text conditioning of one denoiser call, each tensor with the guidance halves first on
    dim 0 in diffusers' order: [unconditional, conditional] when guided, else [conditional].

    ``tensors`` are keyword arguments of the family's denoiser call, by name (SD 1.x:
    ``encoder_hidden_states``, (halves, L, D); SD 3 also ``pooled_projections``, (halves, P); FLUX.1-dev
    also ``guidance``, (halves,)). The first tensor says how many halves there are.
    """

    tensors: dict[str, torch.Tensor]

    @property
    def halves(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def repeated(self, batch: int) -> Conditioning:
        """For a batch of ``batch`` latents: each half repeated ``batch`` times, halves still in order."""
        return Conditioning({name: tensor.repeat_interleave(batch, dim=0) for name, tensor in self.tensors.items()})

    def with_conditional(self, name: str, conditional: torch.Tensor) -> Conditioning:
        """The same conditioning with tensor ``name``'s conditional half replaced (gradients flow to it)."""
        tensor = self.tensors[name]
        replaced = torch.cat([tensor[:1], conditional]) if self.halves == 2 else conditional
        return Conditioning(self.tensors | {name: replaced})

    def detached(self) -> Conditioning:
        """A copy outside any inference-mode graph (records may hold inference tensors)."""
        return Conditioning({name: tensor.clone() for name, tensor in self.tensors.items()})


class Family:
    """What every family adapter provides. Methods take the loaded pipeline (``pipe``), the
    denoiser module or tensors on the model's device; shapes are noted where they matter."""

    name: str = "family"
    pipeline_class: str = ""  # the diffusers pipeline class a saved folder of this family names
    architecture: str = ""  # the denoiser's kind, as tables name it: "UNet" or "MM-DiT"

    # --- loading and shapes
    def load(self, source: str, device: torch.device, dtype: torch.dtype, local_files_only: bool):
        """The family's diffusers pipeline from a folder or a Hub id (never remote code)."""
        raise NotImplementedError

    def denoiser(self, pipe) -> torch.nn.Module:
        raise NotImplementedError

    def latent_channels(self, pipe) -> int:
        raise NotImplementedError

    def latent_size(self, pipe, width: int, height: int) -> tuple[int, int]:
        """(H_lat, W_lat) of a ``width`` x ``height`` picture."""
        raise NotImplementedError

    def rebuilt(self, pipe, denoiser: torch.nn.Module):
        """The same pipeline with another denoiser (the model randomisation test)."""
        raise NotImplementedError

    def example_inputs(self, denoiser: torch.nn.Module, latent_size: tuple[int, int],
                       max_sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """Keyword inputs of one denoiser evaluation (one image, one guidance half) at ``latent_size``
        with the prompt at the length a run encodes it, as zeros on the current default device: what
        ``cost.step_cost`` counts the work of, on the meta device. Only their shapes matter."""
        raise NotImplementedError

    # --- text
    def tokenize(self, pipe, prompt: str, max_sequence_length: int | None = None):
        """The prompt's ``PromptTokens`` (words and the positions the attention maps index), as ``encode``
        with the same ``max_sequence_length`` tokenises it (a family whose maps read T5's tokens pads them
        to that length; None: the pipeline's default; other families ignore it)."""
        raise NotImplementedError

    def vocabulary(self, pipe) -> set[str]:
        """The whole words the tokenizer knows as one token (a closed-vocabulary model's check)."""
        raise NotImplementedError

    def encode(self, pipe, prompt: str, negative_prompt: str, guided: bool,
               max_sequence_length: int | None = None) -> Conditioning:
        """The prompt's conditioning. ``max_sequence_length``: the T5 tokens of a family that has them
        (``ModelSpec.max_sequence_length``; None: the pipeline's default); other families ignore it."""
        raise NotImplementedError

    # --- guidance
    def guided(self, guidance: float) -> bool:
        """Whether a run at guidance scale ``guidance`` predicts an unconditional half beside the conditional
        one and combines them as u + w (c - u): w > 1, as diffusers, for a family trained for classifier-free
        guidance. A guidance-distilled family (FLUX.1) answers False for every w: one prediction per step,
        w an input of the model where it takes one (``with_guidance``)."""
        return guidance > 1.0

    def with_guidance(self, pipe, conditioning: Conditioning, guidance: float) -> Conditioning:
        """``conditioning`` with the guidance scale ``guidance`` added as an input of the denoiser where the
        model takes one (FLUX.1-dev's guidance embedding, one value per row); the same conditioning for
        a family without such an input."""
        return conditioning

    # --- denoising
    def scheduler(self, pipe, settings):
        """A fresh scheduler for one run, on the run's timesteps (schedulers keep per-run state). Its
        ``timesteps`` are what the denoiser sees: ints for DDPM families, floats (1000 sigma) for
        flow matching."""
        raise NotImplementedError

    def noise_levels(self, scheduler, timestep: int | float | None) -> tuple[float, float]:
        """(alpha_bar, sigma) at ``timestep``; ``None``, after the last step, is the clean latent.

        ``alpha_bar`` is the squared coefficient of x0 in x_t; ``sigma`` is the family's own noise
        level (DDPM: sqrt((1 - alpha_bar) / alpha_bar); flow matching: the sigma of
        x_t = (1 - sigma) x0 + sigma eps)."""
        raise NotImplementedError

    def predict(self, pipe, latent_input: torch.Tensor, timestep, conditioning: Conditioning,
                recorder=None) -> torch.Tensor:
        """The denoiser's raw output for a batch already expanded for guidance and scaled; with a
        ``recorder`` (``capture.AttentionRecorder``) the capture processors record into it."""
        raise NotImplementedError

    def clean_estimate(self, scheduler, latents, output, timestep: int | float) -> torch.Tensor:
        """x0_hat, the clean latent the model predicts from its (guided) ``output`` at ``latents``."""
        raise NotImplementedError

    def noise_estimate(self, scheduler, latents, output, timestep: int | float) -> torch.Tensor:
        """eps_hat, the noise the model sees in ``latents``."""
        raise NotImplementedError

    def noised(self, scheduler, clean: torch.Tensor, noise: torch.Tensor, timestep: int | float | None) -> torch.Tensor:
        """x_t of the forward process at ``timestep`` from a clean latent and a noise (DDPM:
        sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; flow matching: (1 - sigma) x0 + sigma eps), in
        float32; ``None`` is the clean latent itself. With a prediction's x0_hat and eps_hat it is also
        the deterministic step to any level, up (inversion) or down."""
        raise NotImplementedError

    def replay_step(self, scheduler, latents, output, timestep: int | float, next_timestep: int | float | None) -> torch.Tensor:
        """x_{t-1} from an output at x_t by a first-order deterministic step (no solver history):
        how the methods and metrics step from a prediction they made themselves."""
        raise NotImplementedError

    # --- pictures
    def decode(self, pipe, latents: torch.Tensor, output_type: str = "pil"):
        """Latents (B, C, h, w) in the denoiser's scale to pictures, as the pipeline decodes."""
        raise NotImplementedError

    def encode_pictures(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Pictures (B, 3, H, W) in [-1, 1] to latents (B, C, h, w) in the denoiser's scale, the inverse of
        ``decode``: the VAE posterior's mode, scaled (and shifted) as the pipeline's image-to-image mode does."""
        raise NotImplementedError

    def fit_preview(self, pipe):
        """A (C [+1]) x 3 linear map from latent channels to RGB for the fast preview."""
        raise NotImplementedError

    # --- attention and layers
    def cross_attention_sites(self, denoiser) -> list[str]:
        """Processor keys of the attention layers whose keys include the text (cross or joint
        attention), in forward order."""
        raise NotImplementedError

    def attention_modules(self, denoiser) -> list[torch.nn.Module]:
        """Every attention module of the denoiser (self and cross), in forward order."""
        raise NotImplementedError

    def layer_grid(self, tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) grid of a site with ``tokens`` image tokens."""
        raise NotImplementedError

    def layer_group(self, site: str, grid: tuple[int, int], sites: Sequence[str] = ()) -> str:
        """The group a site belongs to among ``sites`` (all of them, in forward order), e.g. "up 16×16"
        (block kind and resolution) or "blocks 0–7" (a third of a transformer's blocks)."""
        raise NotImplementedError

    def explicit_attention(self, module, hidden_states, encoder_hidden_states, attention_mask, temb,
                           on_probs: Callable[[torch.Tensor, str], None]):
        """One of the denoiser's attention calls redone with an explicit softmax, returning what the
        module returns. ``on_probs(probs, kind)`` sees the probabilities (batch * heads, rows, keys):
        kind "self" (N, N), "cross" (N, L) or "joint" (N + L, N + L, image tokens first)."""
        raise NotImplementedError

    def hooked_attention(self, module, args: tuple, kwargs: dict, latent_size: tuple[int, int] | None,
                         on_probs: Callable[[torch.Tensor, str, int], None]):
        """One of the denoiser's attention calls as a forward hook on ``module`` saw it (its positional
        ``args`` and keyword ``kwargs``), redone by ``explicit_attention`` on a step whose latent grid is
        ``latent_size``; returns what the module returns. ``on_probs(probs, kind, image_tokens)`` sees
        what ``explicit_attention``'s sees and the call's image token count N (the first N rows and keys
        of a "joint" kind). By default the call's inputs are diffusers' ``Attention`` ones (hidden states
        (B, N, C) or (B, C, h, w), encoder hidden states, attention mask, ``temb``); a family whose
        attention takes other inputs (FLUX.1: rotary embeddings, single-stream blocks) overrides it."""
        hidden_states = call_argument(args, kwargs, 0, "hidden_states")
        encoder_hidden_states = call_argument(args, kwargs, 1, "encoder_hidden_states")
        attention_mask = call_argument(args, kwargs, 2, "attention_mask")
        image_tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        return self.explicit_attention(module, hidden_states, encoder_hidden_states, attention_mask, kwargs.get("temb"),
                                       lambda probs, kind: on_probs(probs, kind, image_tokens))

    def explained_layers(self, denoiser) -> list[str]:
        """Module paths whose outputs DF-CAM explains, in forward order."""
        raise NotImplementedError

    def explained_output(self, output) -> torch.Tensor:
        """The tensor of an explained layer's output that DF-CAM weighs (on the autograd graph): a
        feature map (B, C, h, w), or image tokens (B, N, C) that lie on ``layer_grid``."""
        raise NotImplementedError

    def text_attention_modules(self, pipe) -> list[torch.nn.Module]:
        """The text encoder's self-attention modules, in forward order (token relevance)."""
        raise NotImplementedError

    def text_attention(self, module, hidden_states, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """One text attention redone explicitly: (its output, its probabilities (B, heads, L, L))."""
        raise NotImplementedError

    def hooked_text_attention(self, module, args: tuple, kwargs: dict,
                              hidden_states: torch.Tensor) -> tuple[object, torch.Tensor]:
        """One text-encoder attention call as a forward hook on ``module`` saw it (``args``, ``kwargs``),
        redone by ``text_attention`` on ``hidden_states`` (the call's own, or a leaf standing for them):
        (what the module returns, its probabilities (B, heads, L, L)). By default the module returns
        (output, probabilities), as CLIP's attention does, and takes its mask as ``attention_mask``."""
        output, probs = self.text_attention(module, hidden_states, kwargs.get("attention_mask"))
        return (output, probs), probs

    def encode_ids(self, pipe, ids: torch.Tensor, conditioning: Conditioning) -> Conditioning:
        """``conditioning`` with its conditional half rebuilt, with gradients, from the token ``ids``
        (1, L) of the first text encoder (the one ``text_attention_modules`` names); what other
        encoders contribute is kept as ``conditioning`` holds it."""
        raise NotImplementedError


def call_argument(args: tuple, kwargs: dict, index: int, name: str):
    """Argument ``name`` of a module call, passed by keyword or at position ``index`` (None when absent)."""
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)

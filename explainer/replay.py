"""One denoising step, as the run takes it and as the methods and metrics take it again.

The one place for what guidance means (``guided``: w > 1, as diffusers, asked of the model's family,
since a guidance-distilled family never has an unconditional half; ``combine_guidance``: u + w (c - u))
and for the denoiser's input (``model_input``: the latents expanded for guidance and scaled by the
scheduler). ``step_inputs`` rebuilds what step k of a recorded run needs; the methods
predict from it with ``guided_prediction`` or ``raw_prediction`` and step with ``step_from``.

    >>> inputs = step_inputs(model, run, step=15)
    >>> next_latents = step_from(model, inputs, masked, guided_prediction(model, inputs, masked))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import Conditioning
from .models import LoadedModel


def guided(guidance: float) -> bool:
    """Whether a run with guidance scale ``guidance`` has an unconditional half, as diffusers decides for a
    model trained for classifier-free guidance (w > 1); a family decides for its own models
    (``Family.guided``: a guidance-distilled FLUX.1 never has one)."""
    return guidance > 1.0


def combine_guidance(output: torch.Tensor, guidance: float, halves: int) -> torch.Tensor:
    """``u + w (c - u)`` over the two halves of a batch predicted with an unconditional half (``halves``
    2, halves on dim 0); the output itself for one half (an unguided run, or a guidance-distilled
    family's, whose w is an input of the model instead)."""
    if halves == 1:
        return output
    if halves != 2:
        raise ValueError(f"A batch has one or two guidance halves, got {halves}.")
    unconditional, conditional = output.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def model_input(scheduler, latents: torch.Tensor, timestep, halves: int) -> torch.Tensor:
    """The denoiser's input for latents (B, C, h, w): repeated once per guidance half (dim 0, halves
    outermost) and scaled as the scheduler asks (1 for DDIM and DPM-Solver++; not for Euler). A
    scheduler without ``scale_model_input`` (flow matching's Euler) takes x_sigma unscaled, as its
    pipeline feeds it."""
    expanded = torch.cat([latents] * halves) if halves > 1 else latents
    scale = getattr(scheduler, "scale_model_input", None)
    return expanded if scale is None else scale(expanded, timestep)


@dataclass
class StepInputs:
    """What step k needs, rebuilt from a run: tensors on the model's device and dtype, and a fresh
    scheduler of the run's timesteps. ``next_timestep`` is None after the last step (the clean latent)."""

    latents: torch.Tensor  # x_t, (1, C, h, w)
    next_latents: torch.Tensor  # the real x_{t-1}, (1, C, h, w)
    timestep: int | float  # as the scheduler holds it (flow matching: 1000 sigma)
    next_timestep: int | float | None
    conditioning: Conditioning
    guidance: float
    scheduler: object
    guided: bool  # the run predicted an unconditional half and combined it (``Family.guided``)

    @property
    def conditional_index(self) -> int:
        """Which half of a denoiser batch is the prompt's (diffusers puts the negative prompt first)."""
        return 1 if self.guided else 0


def step_inputs(model: LoadedModel, run, step: int) -> StepInputs:
    """Rebuild x_t, x_{t-1}, the conditioning and the scheduler of ``step`` (1-based) of ``run``."""
    settings, record = run.settings, run.records[step - 1]
    device, dtype = model.device, model.dtype
    guidance = float(settings.guidance)
    with torch.no_grad():
        conditioning = model.encode(settings.prompt, settings.negative_prompt, model.family.guided(guidance), guidance=guidance)
    return StepInputs(
        latents=record.latents.to(device, dtype).clone(),  # clone: records may hold inference tensors
        next_latents=record.next_latents.to(device, dtype).clone(),
        timestep=record.timestep,
        next_timestep=record.next_timestep,
        conditioning=conditioning.detached(),
        guidance=guidance,
        scheduler=model.family.scheduler(model.pipe, settings),
        guided=model.family.guided(guidance),
    )


def raw_prediction(model: LoadedModel, inputs: StepInputs, latents: torch.Tensor,
                   conditioning: Conditioning | None = None, recorder=None) -> torch.Tensor:
    """The denoiser's output for latents (B, C, h, w), one block of B rows per guidance half of
    ``conditioning`` (default: the step's): (halves * B, C, h, w), nothing combined."""
    conditioning = conditioning or inputs.conditioning
    timestep = torch.tensor(inputs.timestep, device=latents.device)
    latent_input = model_input(inputs.scheduler, latents, timestep, conditioning.halves)
    return model.family.predict(model.pipe, latent_input, timestep, conditioning.repeated(latents.shape[0]),
                               recorder=recorder)


def guided_prediction(model: LoadedModel, inputs: StepInputs, latents: torch.Tensor, recorder=None) -> torch.Tensor:
    """The guided denoiser output for a batch of latents (B, C, h, w) at the step's timestep and text."""
    output = raw_prediction(model, inputs, latents, recorder=recorder)
    return combine_guidance(output, inputs.guidance, inputs.conditioning.halves)


def step_from(model: LoadedModel, inputs: StepInputs, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """x_{t-1} from a prediction at ``latents`` by the family's first-order deterministic step (no
    solver history: for a multistep solver it differs slightly from the run's own step)."""
    return model.family.replay_step(inputs.scheduler, latents, prediction, inputs.timestep, inputs.next_timestep)


def noise_from(model: LoadedModel, inputs: StepInputs, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """eps_hat, the noise a prediction at ``latents`` sees (a v- or x0-model's output converted to it)."""
    return model.family.noise_estimate(inputs.scheduler, latents, prediction, inputs.timestep)


__all__ = ["StepInputs", "combine_guidance", "guided", "guided_prediction", "model_input", "noise_from",
           "raw_prediction", "step_from", "step_inputs"]

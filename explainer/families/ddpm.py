"""What families trained as DDPMs share (SD 1.x, SDXL): a cumulative-alpha noise schedule, the
epsilon / v / sample parametrisations, and the DDIM or DPM-Solver++ step."""

from __future__ import annotations

import math

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from ..schedules import timesteps as schedule_timesteps

SMALLEST_ALPHA_BAR = 2.0**-24  # as diffusers' DPM-Solver++ clamps a zero-terminal-SNR schedule


def noise_level(alpha_bar: float) -> float:
    """sigma_t = sqrt((1 - alpha_bar) / alpha_bar), finite at zero terminal SNR (alpha_bar = 0)."""
    alpha_bar = max(alpha_bar, SMALLEST_ALPHA_BAR)
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def alpha_bar(scheduler, timestep: int | None) -> float:
    """The cumulative alpha at ``timestep``; 1.0 after the last step (the clean latent)."""
    return 1.0 if timestep is None else float(scheduler.alphas_cumprod[timestep])


def predicted_original(latents, model_output, alpha_bar: float, prediction_type: str):
    """``x0_hat``, the clean latent the model currently predicts, from its output at ``alpha_bar``."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (latents - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * latents - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unsupported prediction type {prediction_type!r}.")


def predicted_noise(latents, model_output, alpha_bar: float, prediction_type: str):
    """``eps_hat``, the noise the model currently sees in ``latents``, from its output at ``alpha_bar``."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a * model_output + s * latents
    if prediction_type == "sample":
        return (latents - a * model_output) / s
    raise ValueError(f"Unsupported prediction type {prediction_type!r}.")


def ddim_step(latents, model_output, alpha_bar: float, next_alpha_bar: float, prediction_type: str):
    """x_{t-1} from an output at x_t by the deterministic DDIM update (eta = 0), in float32."""
    x0 = predicted_original(latents.float(), model_output.float(), alpha_bar, prediction_type)
    eps = predicted_noise(latents.float(), model_output.float(), alpha_bar, prediction_type)
    return math.sqrt(next_alpha_bar) * x0 + math.sqrt(1 - next_alpha_bar) * eps


def make_scheduler(base_config, settings, device):
    """A fresh scheduler for one run (schedulers keep per-run state), on the run's timesteps.

    DDIM derives each previous timestep from ``T / n``, so it cannot follow a custom list; for
    those, DPM-Solver++ of order 1 is used instead, which is the same update as DDIM (eta = 0).
    """
    custom = schedule_timesteps(settings.schedule, settings.steps, settings.concentration, base_config.num_train_timesteps)
    if settings.scheduler == "ddim" and custom is None:
        scheduler = DDIMScheduler.from_config(base_config, clip_sample=False)  # latents are not images: never clip x0
    else:
        order = 1 if settings.scheduler == "ddim" else 2
        scheduler = DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=order, use_karras_sigmas=False
        )
    if custom is None:
        scheduler.set_timesteps(settings.steps, device=device)
    else:
        scheduler.set_timesteps(timesteps=custom, device=device)
    return scheduler

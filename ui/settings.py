"""The app's own settings: how the Space serves (queue, concurrency, streaming, ZeroGPU durations)
and what its controls start from. The library's bounds are ``explainer.config.LIMITS``; model ids
and defaults are ``explainer.config.MODELS``. The reasons and measurements behind the values:
docs/design.md."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from explainer.config import ModelSpec
from explainer.cost import step_cost


@dataclass(frozen=True)
class AppSettings:
    max_concurrent_runs: int = 2  # runs (and GPU calls) at once, across visitors
    max_queue: int = 32
    max_runs_per_session: int = 4  # groups of runs a visitor's session keeps for scrubbing and export
    max_registered_runs: int = 32  # runs kept by run id for callers without a session (MCP), the oldest dropped
    # ZeroGPU durations (docs/design.md, "ZeroGPU durations"): the work counted in floating-point operations
    # (explainer.cost), at the throughput of a published timing counted the same way, which the Space's GPU
    # is assumed to match: SDXL base, 30 guided steps at 1024x1024 and the decode, in 3.315 s on an A100
    # 80 GB in bfloat16 with SDPA (diffusers' "Accelerate inference of text-to-image diffusion models").
    gpu_reference: tuple[str, int, int, float] = ("stabilityai/stable-diffusion-xl-base-1.0", 30, 1024, 3.315)
    gpu_call_seconds: float = 0.05  # per denoiser call: kernel launches and the run's per-step copies (an allowance)
    gpu_overhead_seconds: float = 15.0  # a ZeroGPU call's fixed part: model to GPU, prompt encoding
    gpu_margin: float = 2.0  # the duration asked for is this many times the estimate (recording's explicit attention)
    max_gpu_seconds: int = 300  # the longest GPU call ZeroGPU takes (signed-in visitors; others may have less)
    # On a CPU, pictures are streamed while drawing and sending them has taken at most this share of
    # the time (every step's numbers still go out); on a GPU every step is drawn.
    cpu_stream_share: float = 0.10
    # Between two picture updates the page gets the step's numbers at least this often (seconds).
    max_update_gap_s: float | None = 1.0
    queue_poll_s: float = 0.02  # how often Gradio's queue looks for new events while it has room
    progress_poll_s: float = 0.1  # ... and for progress to send
    overlay_gallery_side: int = 256  # the Denoise tab's word overlays are drawn at most this side (px)
    concentration_slider_max: float = 200.0  # the λ slider's range (the library allows up to LIMITS.max_concentration)
    rise_masks: int = 200  # DF-RISE masks the Saliency tab starts from (the paper's 500 takes 2.5x as long)
    explained_fraction: float = 0.75  # the Saliency tab starts at this fraction of the run's steps
    compared_guidances: tuple[float, ...] = (1.0, 3.0, 7.5)  # the guidance comparison starts from these
    max_compared_guidances: int = 4  # ... and compares at most this many
    example_wait_s: float = 30.0  # a page opened while the startup example still runs waits this long for it


APP = AppSettings()


def explained_step(steps: int) -> int:
    """The step of a run of ``steps`` steps that the Saliency tab explains first."""
    return max(1, round(steps * APP.explained_fraction))


def work_seconds(spec: ModelSpec, width: int, height: int, evaluations: float, calls: int, decodes: int = 0) -> float:
    """The GPU seconds expected for ``evaluations`` denoiser evaluations of one image each (a guided step
    is two) in ``calls`` denoiser calls, and ``decodes`` VAE decodes, at ``width`` x ``height``."""
    cost = step_cost(spec.id)
    tflops = evaluations * cost.denoiser(width, height) + decodes * cost.decode(width, height)
    return tflops / sustained_tflops() + calls * APP.gpu_call_seconds


def gpu_duration(seconds: float, advice: str) -> int:
    """The ZeroGPU duration to ask for work expected to take ``seconds``: with the fixed part and the
    margin, at most ``max_gpu_seconds``; a ValueError with ``advice`` when even the expected time is longer."""
    expected = APP.gpu_overhead_seconds + seconds
    if expected > APP.max_gpu_seconds:
        raise ValueError(f"This needs about {expected:.0f} s of GPU time, more than one GPU call on this Space may "
                         f"take ({APP.max_gpu_seconds} s). {advice}")
    return math.ceil(min(APP.max_gpu_seconds, APP.gpu_overhead_seconds + APP.gpu_margin * seconds))


@functools.cache
def sustained_tflops() -> float:
    """The throughput the durations assume: the reference timing's counted work over its seconds."""
    model_id, steps, side, seconds = APP.gpu_reference
    cost = step_cost(model_id)
    return (2 * steps * cost.denoiser(side, side) + cost.decode(side, side)) / seconds

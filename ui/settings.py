"""The app's own settings: how the Space serves (queue, concurrency, streaming, ZeroGPU durations)
and what its controls start from. The library's bounds are ``explainer.config.LIMITS``; model ids
and defaults are ``explainer.config.MODELS``. The reasons and measurements behind the values:
docs/design.md."""

from __future__ import annotations

from dataclasses import dataclass

from explainer.config import ModelSpec


@dataclass(frozen=True)
class AppSettings:
    max_concurrent_runs: int = 2  # runs (and GPU calls) at once, across visitors
    max_queue: int = 32
    max_runs_per_session: int = 4  # groups of runs a visitor's session keeps for scrubbing and export
    max_registered_runs: int = 32  # runs kept by run id for callers without a session (MCP), the oldest dropped
    gpu_overhead_seconds: float = 15.0  # a ZeroGPU call's fixed part: model to GPU, prompt encoding, final decode
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


def gpu_seconds(spec: ModelSpec, steps: int, width: int, height: int) -> int:
    """The ZeroGPU duration to ask for ``steps`` guided denoiser calls: from the work, never a constant."""
    pixels = (width * height) / (512 * 512)
    return int(APP.gpu_overhead_seconds + 2 * spec.gpu_seconds_per_step * steps * max(pixels, 0.05))

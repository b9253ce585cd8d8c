"""Diffusion X-Ray: what a text-to-image diffusion model does at every denoising step.

The library behind the app, usable on its own (no Gradio here):

    >>> from explainer import InstrumentedRun, RunSettings, load_model
    >>> run = InstrumentedRun(load_model(), RunSettings(prompt="a red circle on the left", width=64, height=64))
    >>> for record in run.steps():
    ...     print(record.label, record.attention.shape)
"""

from .capture import capture_attention
from .recorder import AttentionRecorder
from .config import DEFAULTS, LIMITS, MODELS, default_model_id
from .families import FAMILIES, Family
from .models import LoadedModel, load_model
from .run import InstrumentedRun, RunSettings, StepRecord
from .schedules import timesteps
from .tokens import PromptTokens

__all__ = [
    "DEFAULTS",
    "LIMITS",
    "MODELS",
    "FAMILIES",
    "AttentionRecorder",
    "Family",
    "InstrumentedRun",
    "LoadedModel",
    "PromptTokens",
    "RunSettings",
    "StepRecord",
    "capture_attention",
    "default_model_id",
    "load_model",
    "timesteps",
]

"""The one interface every explanation method shares, and what a step needs rebuilt from a run.

Every method is a small dataclass of options with one verb, ``explain(model, run, step)``,
returning an ``Explanation`` (in the spirit of Captum's ``attribute``). The public ``explain``
checks its inputs and times the work; each method's private ``_explain`` computes.

Example:
    >>> explanation = DFRise(n_masks=200).explain(model, run, step=15)
    >>> explanation.saliency.shape, explanation.denoiser_calls  # ((H_lat, W_lat), N / batch_size)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LIMITS
from ..maps import normalise
from ..models import LoadedModel, refusing_out_of_memory
from ..run import RunData, check_int, check_number
from .options import option


@dataclass
class Explanation:
    """What a method found at one step.

    Attributes:
        method: the method's name (a key of ``METHODS``).
        step: the explained step (1-based) and ``timestep`` its t_k.
        saliency: float32 (H_lat, W_lat) map in [0, 1] (min-max; all zeros when flat).
        options: all of the method's options, defaults included.
        seconds: wall time of ``explain``; ``denoiser_calls``: denoiser forward passes it made
            (a pass may carry many inputs and both guidance halves).
        per_layer: DF-CAM's per-layer maps (H_lat, W_lat), keyed by module path.
        layer_shares: DF-CAM's share of each layer in the summed map (summing to 1), same keys.
        token_scores: per-word scores in [0, 1], keyed ``"i:word"`` as ``relevance.attention_scores``.
        token_maps: per-word maps (H_lat, W_lat) in [0, 1], same keys.
    """

    method: str
    step: int
    timestep: int
    saliency: np.ndarray
    options: dict
    seconds: float = 0.0
    denoiser_calls: int = 0
    per_layer: dict[str, np.ndarray] | None = None
    layer_shares: dict[str, float] | None = None
    token_scores: dict[str, float] | None = None
    token_maps: dict[str, np.ndarray] | None = None

    def upsampled(self, size: tuple[int, int]) -> np.ndarray:
        """The map resized bilinearly to ``size`` = (width, height), as PIL sizes go; float32 in [0, 1]."""
        width, height = size
        tensor = torch.from_numpy(np.ascontiguousarray(self.saliency, dtype=np.float32))[None, None]
        resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
        return resized[0, 0].clamp(0, 1).numpy()


# How the gradient methods turn a signed gradient x activation into a map: "relu" keeps the part that
# raises the explained quantity (the paper's), "abs" both directions, as vanilla gradient saliency
# |dy/dx| does (Simonyan et al., 2014). Each method declares its default; why each: docs/evaluation.md,
# "What the gradient methods explain".
RECTIFIERS = {"abs": torch.abs, "relu": torch.relu}


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


@dataclass(kw_only=True)
class Method:
    """Base of every method: options are dataclass fields, checked at creation and at each call."""

    name = "method"  # the key of ``METHODS`` and ``VARIANTS``
    label = "method"  # what a person reads
    saliency_tab = True  # offered by the app's Saliency tab (a method with a tab of its own says False)
    memory_advice = "Explain a run of a smaller picture, or give a smaller batch_size where the method has one."

    def __post_init__(self) -> None:
        self._check_options()

    @property
    def options(self) -> dict:
        return dataclasses.asdict(self)

    def explain(self, model: LoadedModel, run: RunData, step: int) -> Explanation:
        """Explain step ``step`` (1-based) of ``run`` with ``model``; see the method's docstring.

        Raises:
            ValueError: ``step`` outside 1..len(run.records), an option out of range, or a run
                whose latents do not fit the model; ``OutOfDeviceMemory`` (a ValueError) when the
                accelerator runs out of memory, saying what to ask instead.
        """
        self._check_options()
        if not run.records:
            raise ValueError("run has no recorded steps yet: explain a step after the run has made it.")
        check_int("step", step, 1, len(run.records))
        latents = run.records[step - 1].latents
        channels = model.family.latent_channels(model.pipe)
        if latents.shape[1] != channels:
            raise ValueError(f"run has {latents.shape[1]} latent channels but the model's denoiser takes {channels}.")
        start = time.perf_counter()
        size = f"{run.settings.width}×{run.settings.height}"
        with refusing_out_of_memory(f"{self.label} of step {step} of a {size} run on {model.id}", self.memory_advice):
            explanation = self._explain(model, run, step)
        explanation.seconds = time.perf_counter() - start
        return explanation

    def _check_options(self) -> None:
        """Raise ValueError naming the option, the rule and the value."""

    def _explain(self, model: LoadedModel, run: RunData, step: int) -> Explanation:
        raise NotImplementedError

    def _result(self, run: RunData, step: int, saliency, **extra) -> Explanation:
        return Explanation(
            method=self.name,
            step=step,
            timestep=run.records[step - 1].timestep,
            saliency=normalise(np.asarray(saliency, dtype=np.float32)),
            options=self.options,
            **extra,
        )


@dataclass(kw_only=True)
class PerturbationMethod(Method):
    """Family base of DF-RISE and DF-LIME: perturbed inputs go through the denoiser ``batch_size`` at a time."""

    batch_size: int = 16

    def _check_options(self) -> None:
        check_int("batch_size", self.batch_size, 1, LIMITS.max_batch_size)


@dataclass(kw_only=True)
class GradientMethod(Method):
    """Family base of DF-CAM and token relevance: hooks and processors are removed in ``finally``.

    Args:
        rectify: "abs" keeps the magnitude of gradient x activation, whichever way it pushes the
            output; "relu" keeps only the positive part, as the paper does. Each method declares its
            own default (see ``RECTIFIERS``).
    """

    rectify: str

    def _check_options(self) -> None:
        check_choice("rectify", self.rectify, tuple(RECTIFIERS))


def batches(total: int, size: int):
    """(start, stop) index pairs covering ``range(total)`` in chunks of ``size``."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


@dataclass(kw_only=True)
class RandomBaseline(Method):
    """A uniform random map (seeded): the baseline every method must beat (docs/methods.md, Baselines)."""

    seed: int = option(0, "Seed", "Same seed, same map.")
    name = "random"
    label = "random baseline"

    def _check_options(self) -> None:
        check_int("seed", self.seed, 0, LIMITS.max_seed)

    def _explain(self, model, run, step):
        height, width = run.records[step - 1].latents.shape[-2:]
        values = np.random.default_rng(self.seed).random((height, width))
        return self._result(run, step, values)


@dataclass(kw_only=True)
class CentreBaseline(Method):
    """A centred Gaussian, ``sigma`` a fraction of the map's side: the centre-bias baseline (docs/methods.md, Baselines)."""

    sigma: float = 0.25
    name = "centre"
    label = "centred baseline"

    def _check_options(self) -> None:
        check_number("sigma", self.sigma, 0.0, 10.0, open_low=True)

    def _explain(self, model, run, step):
        height, width = run.records[step - 1].latents.shape[-2:]
        rows = (np.arange(height) + 0.5) / height - 0.5
        cols = (np.arange(width) + 0.5) / width - 0.5
        values = np.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * self.sigma**2))
        return self._result(run, step, values)


__all__ = [
    "CentreBaseline",
    "Explanation",
    "GradientMethod",
    "Method",
    "PerturbationMethod",
    "RandomBaseline",
    "batches",
]

"""Time-step schedules: uniform, early and latter (the paper's "exponential scheduler"; docs/methods.md, Schedules).

``timesteps("early", 30, concentration=60)`` gives the list of timesteps a run visits, from noisy to clean.
``uniform`` is left to the scheduler (``None``), since its own ``set_timesteps(n)`` defines it.
``flow_sigmas`` maps the same schedules onto flow matching's noise levels (before the model's shift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import SCHEDULE_KINDS

TRAIN_TIMESTEPS = 1000


def timesteps(
    kind: str | Sequence[int],
    steps: int,
    concentration: float = 60.0,
    train_timesteps: int = TRAIN_TIMESTEPS,
) -> list[int] | None:
    """The timesteps of a schedule, strictly decreasing, or None for the scheduler's own uniform one.

    Args:
        kind: ``"uniform"``, ``"early"`` (dense where noise is high), ``"latter"`` (dense where
            noise is low), or an explicit list of integer timesteps.
        steps: the number of denoising steps ``n`` (ignored for an explicit list).
        concentration: concentration ``lambda >= 0``; 0 gives uniform.
        train_timesteps: ``T``, the scheduler's ``num_train_timesteps``.

    Returns:
        A list of ``n`` ints in ``[0, T-1]``, strictly decreasing, or ``None`` for uniform.

    Example:
        >>> timesteps("early", 5, concentration=2)[:2]
        [999, 981]
    """
    if not isinstance(kind, str):
        return check_explicit(kind, train_timesteps)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule must be one of {SCHEDULE_KINDS} or a list of timesteps, got {kind!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if not (isinstance(concentration, (int, float)) and math.isfinite(concentration) and concentration >= 0):
        raise ValueError(f"concentration (the schedule's lambda) must be a finite number >= 0, got {concentration!r}.")
    if kind == "uniform" or concentration == 0:
        return None
    total = train_timesteps
    base = total ** (1.0 / (steps + concentration))
    powers = [math.floor(base ** (i + 1 + concentration)) for i in range(steps)]
    if kind == "early":
        values = [total - 1] + [total - p for p in powers][:-1]
    else:  # latter
        values = sorted((min(p, total - 1) for p in powers), reverse=True)
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(
            f"The {kind!r} schedule with steps={steps} and concentration={concentration} repeats timesteps ({values}); "
            "use fewer steps or a smaller concentration."
        )
    return values


def flow_sigmas(
    kind: str | Sequence[int],
    steps: int,
    concentration: float = 60.0,
    train_timesteps: int = TRAIN_TIMESTEPS,
) -> list[float] | None:
    """A schedule on flow matching's noise levels sigma, before the model's own shift, strictly
    decreasing in (0, 1], or None for the scheduler's own uniform one.

    The paper's timesteps index the T training steps 0..T-1; a flow-matching scheduler trains on
    sigma = 1/T .. 1 (diffusers' t = 1..T). Index t is sigma = (t + 1) / T, so T - 1, where every
    schedule starts, is sigma = 1, the pure noise a run starts from. The scheduler then shifts these
    sigmas as it shifts its own uniform ones (SD 3: s sigma / (1 + (s - 1) sigma)).

    Example:
        >>> flow_sigmas("early", 5, concentration=2)[:2]
        [1.0, 0.982]
    """
    values = timesteps(kind, steps, concentration, train_timesteps)
    return None if values is None else [(value + 1) / train_timesteps for value in values]


def check_explicit(values: Sequence[int], train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """Validate an explicit timestep list: integers, strictly decreasing, within [0, T-1]."""
    values = list(values)
    if not values:
        raise ValueError("An explicit timestep list must not be empty.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"Explicit timesteps must be integers, got {values!r}.")
    out_of_range = [v for v in values if not 0 <= v < train_timesteps]
    if out_of_range:
        raise ValueError(f"Explicit timesteps must lie in [0, {train_timesteps - 1}]; out of range: {out_of_range}.")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"Explicit timesteps must be strictly decreasing (noisy to clean), got {values}.")
    return values


def parse_timestep_list(text: str) -> list[int]:
    """Parse "999, 800, 500" (the UI's and API's text form) into a validated list."""
    try:
        values = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"Timesteps must be comma-separated integers, got {text!r}.") from error
    return check_explicit(values)

"""The cases the meaning checks explain: runs of held-out single-shape prompts, each with the drawn
shape on the latent grid (scripts/meaning_checks.py and the probes beside it share them)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from explainer.run import InstrumentedRun, RunData, RunSettings
from explainer.shapes.truth import shape_grid
from explainer.shapes.world import evaluation_prompts

STEPS = 20  # each case's run
LATE = range(16, 21)  # the steps explained: the last quarter, where the shape is drawn


def single_shape_prompts(count: int) -> list[str]:
    """The first ``count`` held-out prompts that name one shape."""
    prompts = [prompt for prompt, *_ in evaluation_prompts(4 * count) if " and " not in prompt]
    return prompts[:count]


def shape_runs(model, count: int, seed: int) -> Iterator[tuple[str, RunData, np.ndarray]]:
    """(prompt, run, shape) for the first ``count`` single-shape prompts, ``shape`` the drawn shape
    on the latent grid; prompts whose run draws no shape are skipped with a line saying so."""
    for prompt in single_shape_prompts(count):
        settings = RunSettings(prompt=prompt, steps=STEPS, guidance=5.0, width=64, height=64, seed=seed)
        run = InstrumentedRun(model, settings).run_all().data
        shape = shape_grid(run)
        if not shape.any():
            print(f"{prompt!r}: no shape drawn, skipped", flush=True)
            continue
        yield prompt, run, shape

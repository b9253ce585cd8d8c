"""The shapes world's ground truth on the latent grid: the drawn shape, and the shape noun's
cross-attention scored against it (the attention gate; docs/methods.md, Localisation and meaning checks)."""

from __future__ import annotations

import numpy as np

from explainer.render import views
from explainer.metrics import iou, mask_on_grid
from explainer.run import InstrumentedRun, RunData, RunSettings
from explainer.shapes.checker import generated_shape_mask
from explainer.shapes.world import SHAPES


def shape_grid(run: RunData) -> np.ndarray:
    """The drawn shape's pixels (the checker's segmentation of the final image) on the latent grid."""
    return mask_on_grid(generated_shape_mask(np.asarray(run.final_image)), run.latent_size)


def noun_map(run: RunData, groups: list[str] | None = None) -> np.ndarray | None:
    """The first shape noun's cross-attention, mean over the last third of the steps (the attention
    gate's map; ``groups`` as in ``views.word_map``); None when the prompt names no shape."""
    nouns = [i for i, word in enumerate(run.tokens.words) if word.text in SHAPES]
    if not nouns:
        return None
    last_third = run.records[-max(1, len(run.records) // 3) :]
    return views.word_map(run, nouns[0], last_third, groups=groups)


def noun_iou(run: RunData, mask: np.ndarray) -> float | None:
    """IoU of ``noun_map`` thresholded at its mean with ``mask``; None when the prompt names no shape."""
    saliency = noun_map(run)
    return None if saliency is None else iou(saliency, mask)


def noun_attention_iou(model, prompts: list[str], first_seed: int = 1000, steps: int = 20) -> list[float]:
    """The embedded model's attention gate: per prompt, the IoU of the shape noun's cross-attention
    (mean over the last third of the steps, thresholded at its mean) with the drawn shape's pixels."""
    scores = []
    for index, prompt in enumerate(prompts):
        settings = RunSettings(prompt=prompt, seed=first_seed + index, steps=steps, guidance=model.spec.guidance,
                               width=model.spec.width, height=model.spec.height)
        run = InstrumentedRun(model, settings).run_all().data
        mask = shape_grid(run)
        score = noun_iou(run, mask) if mask.any() else None
        scores.append(0.0 if score is None else score)  # no shape drawn (or named): the map cannot match it
    return scores

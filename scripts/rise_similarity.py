"""How should DF-RISE score a masked result against the real x_{t-1}? (issue 6)

Next-latent mode, contrast estimator, 500 masks, on held-out single-shape prompts at the last
quarter of the steps, with the meaning checks' criteria (inside/outside the drawn shape > 1.5;
Spearman with the same map on a randomised UNet < 0.5). Four scores share the masked predictions:
  structure, run:  the SSIM structure term against the run's x_{t-1} (the paper's similarity)
  structure, self: the same against the DDIM step of the unmasked prediction (the same first-order
                   step as the masked results, so a multistep solver's own step does not enter)
  squared, run:    minus the local mean squared difference (same window) against the run's x_{t-1}
  squared, self:   the same against the DDIM step of the unmasked prediction

    python scripts/rise_similarity.py --prompts 12   (about 30 min on the 2-core CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/rise_similarity.py

from explainer.methods import DFRise  # noqa: E402
from explainer.methods.base import batches  # noqa: E402
from explainer.replay import guided_prediction, step_from, step_inputs  # noqa: E402
from explainer.methods.rise import negative_squared_error, structure_term  # noqa: E402
from explainer.metrics import inside_outside_ratio, spearman  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.shapes.cases import LATE, shape_runs  # noqa: E402

SCORES = {
    "structure, run": (structure_term, "run"),
    "structure, self": (structure_term, "self"),
    "squared, run": (negative_squared_error, "run"),
    "squared, self": (negative_squared_error, "self"),
}


def maps(model, run, step: int, rise: DFRise) -> dict[str, np.ndarray]:
    """Each score's DF-RISE map of one step, from one pass of the masks through the denoiser."""
    inputs = step_inputs(model, run, step)
    size = tuple(inputs.latents.shape[-2:])
    masks = rise.masks(size)
    with torch.no_grad():
        unmasked_step = step_from(model, inputs, inputs.latents, guided_prediction(model, inputs, inputs.latents))
    references = {"run": inputs.next_latents, "self": unmasked_step}
    sums = {name: [torch.zeros(size), torch.zeros(size)] for name in SCORES}  # sum_n M_n S_n, sum_n S_n
    for start, stop in batches(rise.n_masks, rise.batch_size):
        batch = masks[start:stop]
        with torch.no_grad():
            masked = batch * inputs.latents
            compared = step_from(model, inputs, inputs.latents.expand_as(masked), guided_prediction(model, inputs, masked))
        for name, (score, reference) in SCORES.items():
            values = score(references[reference], compared)
            sums[name][0] += (batch[:, 0] * values).sum(0)
            sums[name][1] += values.sum(0)
    weight = masks[:, 0].sum(0)
    return {name: rise.combine(kept, total, weight).clamp(min=0).numpy() for name, (kept, total) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    model = load_model()
    random_model = model.randomised()
    rise = DFRise(n_masks=500, batch_size=100, similarity="structure")  # masks and estimator; the scores are above
    rows = {name: [] for name in SCORES}
    for prompt, run, shape in shape_runs(model, args.prompts, args.seed):
        for step in LATE:
            trained, shuffled = maps(model, run, step, rise), maps(random_model, run, step, rise)
            for name in SCORES:
                rows[name].append((step, inside_outside_ratio(trained[name], shape), spearman(trained[name], shuffled[name])))
        print(prompt, " | ".join(f"{name}: ratios {[round(r, 1) for _, r, _ in rows[name][-5:]]} "
                                 f"spearman max {max(c for *_, c in rows[name][-5:]):.2f}" for name in SCORES), flush=True)
    for name, found in rows.items():
        steps, ratios, correlations = np.array(found).T
        per_step = {int(s): int(np.sum(ratios[steps == s] > 1.5)) for s in LATE}
        print(f"{name:16s} inside/outside > 1.5: {np.sum(ratios > 1.5)} of {len(ratios)} (median {np.median(ratios):.2f}, "
              f"per step {per_step}); Spearman < 0.5: {np.sum(correlations < 0.5)} of {len(ratios)} (largest {np.nanmax(correlations):.2f})")


if __name__ == "__main__":
    main()

"""Why does a centred Gaussian win insertion/deletion on the shapes model? (issue 9)

Scores maps that carry no content (Gaussians at the centre, at the four sides, a border-first map,
a random map) against one that knows the answer (the drawn shape's own mask, an "oracle"), on the
same runs, with both distances. If position alone decides the score, the side Gaussians and the
border-first map lose to the centre by as much as the oracle differs from random.

    python scripts/centre_bias.py --prompts 6 --distance 1-ssim mse
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
import json

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/centre_bias.py

from explainer import metrics  # noqa: E402
from explainer.evaluate.protocol import REFERENCE, Protocol, default_prompts, make_map  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.run import InstrumentedRun, RunSettings  # noqa: E402
from explainer.shapes.truth import shape_grid  # noqa: E402


def gaussian(size: int, row: float, col: float, sigma: float = 0.25) -> np.ndarray:
    """A Gaussian bump centred at (row, col), both fractions of the side."""
    grid = (np.arange(size) + 0.5) / size
    return np.exp(-((grid[:, None] - row) ** 2 + (grid[None, :] - col) ** 2) / (2 * sigma**2))


def content_free_maps(size: int, seed: int) -> dict[str, np.ndarray]:
    centre = gaussian(size, 0.5, 0.5)
    return {
        "centre": centre,
        "border-first": 1 - centre,
        "left": gaussian(size, 0.5, 0.15),
        "right": gaussian(size, 0.5, 0.85),
        "top": gaussian(size, 0.15, 0.5),
        "bottom": gaussian(size, 0.85, 0.5),
        "random": np.random.default_rng(seed).random((size, size)),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded/shapes-ldm")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step", type=int, default=15)
    parser.add_argument("--distance", nargs="+", default=["1-ssim", "mse"])
    args = parser.parse_args(argv)

    model = load_model(args.model)
    results: dict = {}
    for index, prompt in enumerate(default_prompts(model.id, args.prompts)):
        settings = RunSettings(prompt=prompt, seed=1 + index, steps=args.steps, guidance=model.spec.guidance,
                               width=model.spec.width, height=model.spec.height)
        run = InstrumentedRun(model, settings).run_all().data
        size = run.latent_size[0]
        maps = content_free_maps(size, index)
        if shape_grid(run).any():  # the evaluation's reference: the drawn shape, ties broken centre-first
            maps["oracle"] = make_map(REFERENCE, Protocol(model=model.id), model, run, args.step)
        for distance in args.distance:
            for name, saliency in maps.items():
                scored = metrics.insertion_deletion(model, run, args.step, saliency, distance=distance)
                entry = results.setdefault(distance, {}).setdefault(name, {"insertion": [], "deletion": []})
                entry["insertion"].append(scored["insertion_auc"])
                entry["deletion"].append(scored["deletion_auc"])
        print(f"{index + 1}/{args.prompts} {prompt!r}", flush=True)
    summary = {d: {name: {k: round(float(np.mean(v)), 3) for k, v in e.items()} for name, e in per.items()}
               for d, per in results.items()}
    for distance, per in summary.items():
        print(f"\n{distance}: insertion AUC (lower is better) / deletion AUC (higher is better)")
        for name, entry in sorted(per.items(), key=lambda item: item[1]["insertion"]):
            print(f"  {name:13s} {entry['insertion']:.3f} / {entry['deletion']:.3f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

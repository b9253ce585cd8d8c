"""Which DF-CAM layers look at the shape, and which at the image's edges? (issue 6)

DF-CAM sums its per-layer maps, in the target's units by default or each min-maxed as the paper has
it (``--layer-scale min-max``, every layer weighing the same). On held-out single-shape prompts at
the last steps, this prints for the summed map and for each layer: how often the map's mean inside
the drawn shape is over 1.5 times its mean outside (the issue's criterion), the median of that
ratio, the map's mean on the outermost ring of latent pixels over its mean on the other pixels off
the shape (> 1: the layer favours the edges), and the layer's median share of the summed map.

    python scripts/cam_layers.py --prompts 12 [--target sum] [--weighting grad-cam] [--layer-scale min-max]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/cam_layers.py

from explainer.methods import DFCam  # noqa: E402
from explainer.methods.cam import LAYER_SCALES, TARGETS, WEIGHTINGS  # noqa: E402
from explainer.metrics import inside_outside_ratio  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.shapes.cases import LATE, STEPS, shape_runs  # noqa: E402

SUMMED = "sum (DF-CAM)"


def edge_ratio(saliency: np.ndarray, shape: np.ndarray) -> float:
    """Mean on the outermost ring of pixels over the mean on the other pixels, shape pixels left out."""
    ring = np.zeros(saliency.shape, bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    inner = ~ring & ~shape
    outer = ring & ~shape
    denominator = saliency[inner].mean()
    return float(saliency[outer].mean() / denominator) if denominator > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", choices=list(TARGETS), default=DFCam.target)
    parser.add_argument("--weighting", choices=list(WEIGHTINGS), default=DFCam.weighting)
    parser.add_argument("--layer-scale", choices=list(LAYER_SCALES), default=DFCam.layer_scale)
    args = parser.parse_args()
    model = load_model()
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for _, run, shape in shape_runs(model, args.prompts, args.seed):
        for step in LATE:
            method = DFCam(target=args.target, weighting=args.weighting, layer_scale=args.layer_scale)
            explanation = method.explain(model, run, step)
            shares = {SUMMED: 1.0, **explanation.layer_shares}
            for name, saliency in {SUMMED: explanation.saliency, **explanation.per_layer}.items():
                rows.setdefault(name, []).append((inside_outside_ratio(saliency, shape), edge_ratio(saliency, shape), shares[name]))
    print(f"{len(rows[SUMMED])} (prompt, step) pairs, steps {LATE.start}-{LATE.stop - 1} of {STEPS}")
    print(f"{'layer':48s} {'ratio > 1.5':>11s} {'median ratio':>12s} {'median edge/inner':>17s} {'median share':>12s}")
    order = sorted(rows, key=lambda name: (name != SUMMED, -np.median([row[0] for row in rows[name]])))
    for name in order:
        ratios, edges, shares = np.array(rows[name]).T
        print(f"{name:48s} {np.mean(ratios > 1.5):11.2f} {np.median(ratios):12.2f} {np.median(edges):17.2f} {np.median(shares):12.3f}")


if __name__ == "__main__":
    main()

"""How far can the attention gate go on a 16x16 latent grid? (issue 4)

The gate thresholds the noun's map at its mean and takes the IoU with the drawn shape on the
latent grid. A map whose above-mean region is the shape grown by one latent cell already loses a
lot there: shapes cover 4 to 22 cells. This script prints that bound for single-shape scenes of
the world (at the 16x16 grid and, for comparison, at 32x32), then measures where the embedded
model's above-mean region actually lies: inside the shape, within one or two cells of it, or
farther away, for all layers and for each layer group.

    python scripts/attention_gate_bound.py --prompts 40 --figure assets/shapes-ldm/attention_gate.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/attention_gate_bound.py

from explainer import config  # noqa: E402
from explainer.metrics import iou, mask_on_grid  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.render import views  # noqa: E402
from explainer.run import InstrumentedRun, RunSettings  # noqa: E402
from explainer.shapes.quality import FIRST_SEED  # noqa: E402
from explainer.shapes.truth import noun_map, shape_grid  # noqa: E402
from explainer.shapes.world import evaluation_prompts, generate_scene  # noqa: E402

EIGHT_NEIGHBOURS = np.ones((3, 3), bool)


def halo_bounds(scenes: int, grid: int) -> dict[str, float]:
    """Mean IoU of each single-shape scene's cells with the same cells grown by one cell."""
    rng = np.random.default_rng(0)
    bounds = {"8-neighbour": [], "4-neighbour": []}
    while len(bounds["8-neighbour"]) < scenes:
        scene = generate_scene(rng)
        if len(scene.shapes) != 1:
            continue
        cells = mask_on_grid(scene.shapes[0].mask, (grid, grid))
        if not cells.any():
            continue
        bounds["8-neighbour"].append(cells.sum() / binary_dilation(cells, EIGHT_NEIGHBOURS).sum())
        bounds["4-neighbour"].append(cells.sum() / binary_dilation(cells).sum())
    return {name: float(np.mean(values)) for name, values in bounds.items()}


def where_the_region_lies(region: np.ndarray, shape: np.ndarray) -> dict[str, float]:
    """Shares of the above-mean cells inside the shape, in its first and second ring, and beyond."""
    one = binary_dilation(shape, EIGHT_NEIGHBOURS)
    two = binary_dilation(one, EIGHT_NEIGHBOURS)
    total = max(1, region.sum())
    return {
        "inside": (region & shape).sum() / total,
        "ring 1": (region & one & ~shape).sum() / total,
        "ring 2": (region & two & ~one).sum() / total,
        "beyond": (region & ~two).sum() / total,
        "region / shape cells": region.sum() / max(1, shape.sum()),
    }


def figure_row(run, saliency: np.ndarray, shape: np.ndarray, side: int = 96) -> np.ndarray:
    """The image, the map (min-max, grey) and the above-mean region (red) over the shape (green)."""
    region = saliency > saliency.mean()
    grey = (saliency - saliency.min()) / max(1e-12, float(saliency.max() - saliency.min()))
    cells = np.stack([region, shape, np.zeros_like(shape)], -1).astype(np.uint8) * 255
    tiles = [run.final_image, Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB"), Image.fromarray(cells)]
    return np.concatenate([np.asarray(t.resize((side, side), Image.Resampling.NEAREST)) for t in tiles], 1)


def measure_model(prompts: int, figure: str | None = None, figure_rows: int = 8) -> dict[str, dict[str, float]]:
    model = load_model(config.EMBEDDED_MODEL_ID)
    spec = model.spec
    rows: dict[str, list[dict[str, float]]] = {}
    pictures = []
    for index, (prompt, *_) in enumerate(evaluation_prompts(prompts)):
        settings = RunSettings(prompt=prompt, seed=FIRST_SEED + index, steps=20, guidance=spec.guidance,
                               width=spec.width, height=spec.height, per_group=True)
        run = InstrumentedRun(model, settings).run_all().data
        shape = shape_grid(run)
        if noun_map(run) is None or not shape.any():
            continue
        for name, groups in {"all layers": None, **{g: [g] for g in views.layer_groups(run)}}.items():
            saliency = noun_map(run, groups)
            row = where_the_region_lies(saliency > saliency.mean(), shape) | {"IoU": iou(saliency, shape)}
            rows.setdefault(name, []).append(row)
            if groups is None and len(pictures) < figure_rows:
                pictures.append(figure_row(run, saliency, shape))
    if figure:
        Image.fromarray(np.concatenate(pictures, 0)).save(figure)
    return {name: {key: float(np.mean([r[key] for r in found])) for key in found[0]} for name, found in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--figure", help="save the first prompts' image, all-layer noun map and regions here (PNG)")
    args = parser.parse_args()
    for grid in (16, 32):
        bounds = halo_bounds(args.scenes, grid)
        print(f"{grid}x{grid} grid, IoU of a single shape with itself grown by one cell: "
              + ", ".join(f"{name} {value:.3f}" for name, value in bounds.items()))
    print(f"\nthe embedded model, {args.prompts} held-out prompts, noun map over the last third of the steps:")
    for name, row in measure_model(args.prompts, args.figure).items():
        print(f"  {name:12s} " + "  ".join(f"{key} {value:.2f}" for key, value in row.items()))


if __name__ == "__main__":
    main()

"""Issue 6's meaning checks on more prompts than the tests run: for each held-out single-shape
prompt, each method's inside/outside ratio (the drawn shape's latent pixels against the rest) at
the last quarter of the steps, and its Spearman correlation with the same method on the model with
re-initialised UNet weights (Adebayo et al., 2018). Criteria: ratio > 1.5, Spearman < 0.5.

    python scripts/meaning_checks.py --prompts 12   (about 30 min on the 2-core CPU, every variant)
    python scripts/meaning_checks.py --methods df-cam "df-cam (paper)"   (those rows only; the
        others' rows are kept from --out)

Beside the methods, a reference that is not one: the size of the step's own change x_{t-1} - x_t
at each latent pixel, with its ratio: a map of step k need not favour the shape where the step
itself does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from explainer.evaluate import shape_grid
from explainer.methods import DFCam, DFRise, TokenRelevance
from explainer.metrics import inside_outside_ratio, spearman
from explainer.models import load_model
from explainer.run import InstrumentedRun, RunSettings
from explainer.shapes.world import SHAPES, evaluation_prompts

STEPS, LATE = 20, range(16, 21)
METHODS = {
    "df-rise": lambda noun: DFRise(n_masks=500, batch_size=100),
    "df-cam": lambda noun: DFCam(),
    "relevance": lambda noun: TokenRelevance(word=noun),
    # the paper's rules where the defaults differ, and other options (cam.TARGETS, cam.WEIGHTINGS,
    # cam.LAYER_SCALES, base.RECTIFIERS), for comparison
    "df-rise (structure)": lambda noun: DFRise(n_masks=500, batch_size=100, similarity="structure"),
    "df-cam (paper)": lambda noun: DFCam(target="sum", weighting="grad-cam", layer_scale="min-max"),
    "df-cam (grad-cam)": lambda noun: DFCam(weighting="grad-cam", layer_scale="min-max"),
    "df-cam (hirescam)": lambda noun: DFCam(weighting="hirescam"),
    "df-cam (abs)": lambda noun: DFCam(rectify="abs"),
    "relevance (relu)": lambda noun: TokenRelevance(word=noun, rectify="relu"),
}

# Not a method: a reference of what step k itself does, the size of x_{t-1} - x_t at each latent pixel.
# Where the step's own change does not favour the shape, a faithful map of that step need not either.
STEP_CHANGE = "step change (reference)"


def step_change(run, step: int) -> np.ndarray:
    record = run.records[step - 1]
    return (record.next_latents.float() - record.latents.float())[0].norm(dim=0).numpy()


def single_shape_prompts(count: int) -> list[str]:
    prompts = [prompt for prompt, *_ in evaluation_prompts(4 * count) if " and " not in prompt]
    return prompts[:count]


def shape_runs(model, count: int, seed: int):
    """(prompt, run, shape) for the first ``count`` held-out single-shape prompts, ``shape`` the drawn
    shape on the latent grid; prompts whose run draws no shape are skipped with a line saying so."""
    for prompt in single_shape_prompts(count):
        settings = RunSettings(prompt=prompt, steps=STEPS, guidance=5.0, width=64, height=64, seed=seed)
        run = InstrumentedRun(model, settings).run_all().data
        shape = shape_grid(run)
        if not shape.any():
            print(f"{prompt!r}: no shape drawn, skipped", flush=True)
            continue
        yield prompt, run, shape


def summarise(rows: list[dict]) -> dict:
    """Per method: how many (prompt, step) pairs pass each criterion, in all and step by step."""
    summary = {}
    for name in [*METHODS, STEP_CHANGE]:
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        summary[name] = {
            "ratio_passes": f"{sum(r['ratio'] > 1.5 for r in mine)} of {len(mine)}",
            "ratio_median": float(np.median([r["ratio"] for r in mine])),
            "ratio_passes_per_step": {step: f"{sum(r['ratio'] > 1.5 for r in mine if r['step'] == step)} of "
                                            f"{sum(r['step'] == step for r in mine)}" for step in LATE},
            "ratio_median_per_step": {step: float(np.median([r["ratio"] for r in mine if r["step"] == step])) for step in LATE},
        }
        if name != STEP_CHANGE:
            summary[name]["spearman_passes"] = f"{sum(r['spearman'] < 0.5 for r in mine)} of {len(mine)}"
            summary[name]["spearman_max"] = float(np.nanmax([r["spearman"] for r in mine]))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="docs/results/meaning-checks.json")
    names = [*METHODS, STEP_CHANGE]
    parser.add_argument("--methods", nargs="+", choices=names, default=names)
    args = parser.parse_args(argv)
    methods = {name: METHODS[name] for name in args.methods if name in METHODS}
    model = load_model()
    random_model = model.randomised()
    rows = []
    for prompt, run, mask in shape_runs(model, args.prompts, args.seed):
        noun = next(word for word in prompt.replace(",", " ").split() if word in SHAPES)
        for name, make in methods.items():
            for step in LATE:
                trained = make(noun).explain(model, run, step).saliency
                shuffled = make(noun).explain(random_model, run, step).saliency
                row = dict(prompt=prompt, method=name, step=step, ratio=inside_outside_ratio(trained, mask),
                           spearman=spearman(trained, shuffled), shape_pixels=int(mask.sum()))
                rows.append(row)
            done = [r for r in rows if r["prompt"] == prompt and r["method"] == name]
            print(f"{prompt!r} {name}: ratios {[round(r['ratio'], 2) for r in done]} "
                  f"spearman {[round(r['spearman'], 2) for r in done]}", flush=True)
        if STEP_CHANGE in args.methods:
            ratios = [inside_outside_ratio(step_change(run, step), mask) for step in LATE]
            rows += [dict(prompt=prompt, method=STEP_CHANGE, step=step, ratio=ratio, spearman=None, shape_pixels=int(mask.sum()))
                     for step, ratio in zip(LATE, ratios)]
            print(f"{prompt!r} {STEP_CHANGE}: ratios {[round(r, 2) for r in ratios]}", flush=True)
    if set(args.methods) != set(names) and Path(args.out).is_file():  # keep the other methods' rows
        kept = json.loads(Path(args.out).read_text())["rows"]
        rows = [row for row in kept if row["method"] in names and row["method"] not in args.methods] + rows
    summary = summarise(rows)
    print(json.dumps(summary, indent=2))
    with open(args.out, "w") as file:
        json.dump({"summary": summary, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()

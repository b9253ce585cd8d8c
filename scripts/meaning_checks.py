"""Issue 6's meaning checks on more prompts than the tests run: for each held-out single-shape
prompt, each method's inside/outside ratio (the drawn shape's latent pixels against the rest) at
the last quarter of the steps, and its Spearman correlation with the same method on the model with
re-initialised UNet weights (Adebayo et al., 2018). Criteria: ratio > 1.5, Spearman < 0.5.

    python scripts/meaning_checks.py --prompts 12   (every variant; DF-LIME's two rows take the longest)
    python scripts/meaning_checks.py --methods df-cam "df-cam (paper)"   (those rows only; the
        others' rows are kept from --out)

Beside the methods, a reference that is not one: the size of the step's own change x_{t-1} - x_t
at each latent pixel, with its ratio: a map of step k need not favour the shape where the step
itself does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/meaning_checks.py

from explainer.methods import VARIANTS  # noqa: E402
from explainer.metrics import inside_outside_ratio, spearman  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.shapes.cases import LATE, shape_runs  # noqa: E402
from explainer.shapes.world import SHAPES  # noqa: E402

# Each row (its label in the results) and the method variant it checks (explainer.methods.VARIANTS):
# the defaults, then the paper's rules where they differ and other options, for comparison.
CHECKED = {
    "df-rise": "df-rise", "df-cam": "df-cam", "relevance": "relevance", "df-lime": "df-lime",
    "df-rise (structure)": "df-rise-structure", "df-cam (paper)": "df-cam-paper", "df-cam (grad-cam)": "df-cam-gradcam",
    "df-cam (hirescam)": "df-cam-hirescam", "df-cam (abs)": "df-cam-abs", "relevance (relu)": "relevance-paper",
    "df-lime (paper)": "df-lime-paper",
}
SIZES = {"df-rise": {"n_masks": 500, "batch_size": 100}, "df-lime": {"batch_size": 100}}  # the checks' sizes


def checked_method(label: str, noun: str):
    """The method of row ``label``; token relevance explains the shape's own word."""
    chosen = VARIANTS[CHECKED[label]]
    return chosen.build(**SIZES.get(chosen.method, {}), **({"word": noun} if chosen.method == "relevance" else {}))


# Not a method: a reference of what step k itself does, the size of x_{t-1} - x_t at each latent pixel.
# Where the step's own change does not favour the shape, a faithful map of that step need not either.
STEP_CHANGE = "step change (reference)"


def step_change(run, step: int) -> np.ndarray:
    record = run.records[step - 1]
    return (record.next_latents.float() - record.latents.float())[0].norm(dim=0).numpy()


def summarise(rows: list[dict]) -> dict:
    """Per method: how many (prompt, step) pairs pass each criterion, in all and step by step."""
    summary = {}
    for name in [*CHECKED, STEP_CHANGE]:
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
    names = [*CHECKED, STEP_CHANGE]
    parser.add_argument("--methods", nargs="+", choices=names, default=names)
    args = parser.parse_args(argv)
    methods = [name for name in args.methods if name in CHECKED]
    model = load_model()
    random_model = model.randomised()
    rows = []
    for prompt, run, mask in shape_runs(model, args.prompts, args.seed):
        noun = next(word for word in prompt.replace(",", " ").split() if word in SHAPES)
        for name in methods:
            for step in LATE:
                trained = checked_method(name, noun).explain(model, run, step).saliency
                shuffled = checked_method(name, noun).explain(random_model, run, step).saliency
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

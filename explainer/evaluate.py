"""Evaluate the explanation methods: insertion/deletion AUC, correlation and localisation (docs/methods.md).

One command, from the embedded model on a CPU to the paper's protocol on a GPU:

    python -m explainer.evaluate                                   # embedded shapes model, defaults
    python -m explainer.evaluate --model CompVis/stable-diffusion-v1-4 --prompts coco.txt --num-prompts 1000
    accelerate launch --num_processes 8 -m explainer.evaluate ...  # GPUs: prompts split, one table gathered
    torchrun --nproc_per_node 2 -m explainer.evaluate ...          # the same split on CPU processes

Per prompt it makes a run, explains one step with every method, scores each map by insertion and
deletion, correlates the maps, and, on the shapes world, scores them against the drawn shape.
Writes ``results.json``, ``results.csv`` and ``curves.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from . import config, metrics, views
from .plots import figure_to_image, new_figure, normalise
from .methods import METHODS
from .models import load_model
from .run import InstrumentedRun, RunData, RunSettings

MAP_METHODS = ("df-rise", "df-rise-structure", "df-rise-paper", "df-cam", "df-cam-paper", "df-cam-gradcam", "df-cam-hirescam",
               "df-cam-abs", "df-lime", "cross-attention", "relevance", "relevance-paper", "random", "centre")
# Other options of a method, scored beside its defaults: the paper's rules where the defaults differ.
VARIANTS = {
    "df-rise-structure": ("df-rise", dict(similarity="structure")),  # the SSIM structure term in next-latent mode
    "df-rise-paper": ("df-rise", dict(mode="paper", estimator="sum")),  # the paper's score and undivided sum
    "df-cam-paper": ("df-cam", dict(target="sum", weighting="grad-cam", layer_scale="min-max")),  # the paper's rules
    "df-cam-gradcam": ("df-cam", dict(weighting="grad-cam", layer_scale="min-max")),  # the paper's, guidance target
    "df-cam-hirescam": ("df-cam", dict(weighting="hirescam")),  # the whole gradient at each pixel
    "df-cam-abs": ("df-cam", dict(rectify="abs")),  # |each layer's weighted sum|
    "relevance-paper": ("relevance", dict(rectify="relu")),  # clamp(G * A, min=0)
}
# A map that knows the answer, as an upper reference on the shapes world: the drawn shape's own pixels.
REFERENCE = "shape-mask"
# cheap enough at 3 phases
LOCALISED = ("df-rise", "df-cam", "df-cam-paper", "df-cam-gradcam", "df-cam-hirescam", "df-cam-abs", "cross-attention",
             "relevance", "relevance-paper", "random", "centre")


@dataclass
class Protocol:
    """Settings of one evaluation (the paper's setting: 20 steps, explain step 15, seed 1, guidance 7.5 for SD; docs/methods.md)."""

    model: str
    steps: int = 20
    step: int = 15
    guidance: float = 5.0
    seed: int = 1
    masks: int = 500
    lime_samples: int = 1000
    batch_size: int = 64
    distances: tuple[str, ...] = ("1-ssim", "mse")  # the first is the main table's; all come from the same states
    methods: tuple[str, ...] = MAP_METHODS

    @property
    def distance(self) -> str:
        return self.distances[0]


def make_map(name: str, protocol: Protocol, model, run: RunData, step: int) -> np.ndarray:
    """The saliency map of method ``name`` at ``step`` (H_lat, W_lat), in [0, 1]."""
    if name == REFERENCE:  # ties (the whole background) broken centre-first, as a centred map would
        return shape_grid(run).astype(np.float32) + 0.01 * METHODS["centre"]().explain(model, run, step).saliency
    if name == "cross-attention":  # raw attention of all prompt words, as recorded
        maps = [views.word_map(run, i, [run.records[step - 1]]) for i in range(len(run.tokens.words))]
        return normalise(np.sum(maps, axis=0)) if maps else np.zeros(run.latent_size, np.float32)
    method_name, variant = VARIANTS.get(name, (name, {}))
    options = {
        "df-rise": dict(n_masks=protocol.masks, batch_size=protocol.batch_size, mode="next-latent"),
        "df-lime": dict(n_samples=protocol.lime_samples, batch_size=protocol.batch_size),
        "random": dict(seed=run.settings.seed),
    }.get(method_name, {})
    method = METHODS[method_name](**(options | variant))
    return method.explain(model, run, step).saliency


def evaluate_prompt(protocol: Protocol, model, index: int, prompt: str) -> dict:
    """Every number for one prompt: AUCs and curves per method, correlations, localisation."""
    settings = RunSettings(prompt=prompt, seed=protocol.seed + index, steps=protocol.steps, guidance=protocol.guidance,
                           width=model.spec.width, height=model.spec.height)
    run = InstrumentedRun(model, settings).run_all().data
    step = protocol.step
    maps = {name: make_map(name, protocol, model, run, step) for name in protocol.methods}
    row = {"index": index, "prompt": prompt, "seed": settings.seed, "step": step, "methods": {}}
    scored_maps = dict(maps)
    if config.MODELS[model.id].closed_vocabulary:
        scored_maps[REFERENCE] = make_map(REFERENCE, protocol, model, run, step)
    for name, saliency in scored_maps.items():
        scored = metrics.insertion_deletion_by_distance(model, run, step, saliency, protocol.distances, protocol.batch_size)
        row["methods"][name] = scored[protocol.distance] | {
            "other_distances": {d: scored[d] for d in protocol.distances[1:]}}
    row["spearman"] = {f"{a} | {b}": metrics.spearman(maps[a], maps[b]) for a, b in combinations(maps, 2)}
    attention = [make_map("cross-attention", protocol, model, run, k) for k in range(1, len(run.records) + 1)]
    row["attention_consecutive_spearman"] = [metrics.spearman(a, b) for a, b in zip(attention, attention[1:])]
    if config.MODELS[model.id].closed_vocabulary:
        row["localisation"] = localisation(protocol, model, run, maps)
    return row


def phases(steps: int) -> dict[str, int]:
    return {"early": max(1, round(steps * 0.2)), "middle": max(1, round(steps * 0.5)), "late": max(1, round(steps * 0.85))}


def localisation(protocol: Protocol, model, run: RunData, maps_at_step: dict) -> dict:
    """Pointing game and IoU of each map against the drawn shape, at early, middle and late steps;
    and the shape noun's attention IoU (last third of the steps), as DAAM reports."""
    mask = shape_grid(run)
    if not mask.any() or mask.all():
        return {"shape_found": False}
    result = {"shape_found": True, "phases": {}}
    for phase, step in phases(len(run.records)).items():
        result["phases"][phase] = {}
        for name in (n for n in LOCALISED if n in protocol.methods):
            saliency = maps_at_step[name] if step == protocol.step else make_map(name, protocol, model, run, step)
            result["phases"][phase][name] = {"pointing": pointing_game(saliency, mask), "iou": iou(saliency, mask)}
    if (score := noun_iou(run, mask)) is not None:
        result["noun_iou"] = score
    return result


def noun_map(run: RunData, groups: list[str] | None = None) -> np.ndarray | None:
    """The first shape noun's cross-attention, mean over the last third of the steps (the attention
    gate's map; ``groups`` as in ``views.word_map``); None when the prompt names no shape."""
    from .shapes.world import SHAPES

    nouns = [i for i, word in enumerate(run.tokens.words) if word.text in SHAPES]
    if not nouns:
        return None
    last_third = run.records[-max(1, len(run.records) // 3) :]
    return views.word_map(run, nouns[0], last_third, groups=groups)


def noun_iou(run: RunData, mask: np.ndarray) -> float | None:
    """IoU of ``noun_map`` thresholded at its mean with ``mask``; None when the prompt names no shape."""
    saliency = noun_map(run)
    return None if saliency is None else iou(saliency, mask)


def shape_grid(run: RunData) -> np.ndarray:
    """The drawn shape's pixels (the checker's segmentation of the final image) on the latent grid."""
    from .shapes.checker import generated_shape_mask

    return mask_on_grid(generated_shape_mask(np.asarray(run.final_image)), run.latent_size)


def mask_on_grid(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A pixel mask on the latent grid: a latent pixel is in when at least half its patch is."""
    small = Image.fromarray(mask.astype(np.float32)).resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(small) >= 0.5


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float:
    """1 when the map's maximum falls on the mask (dilated by one latent pixel, the usual tolerance)."""
    from scipy.ndimage import binary_dilation

    peak = np.unravel_index(np.argmax(saliency), saliency.shape)
    return float(binary_dilation(mask)[peak])


def iou(saliency: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the map thresholded at its mean with the mask."""
    region = saliency > saliency.mean()
    union = (region | mask).sum()
    return float((region & mask).sum() / union) if union else 0.0


def mean_interval(values) -> dict:
    """Mean and 95 % interval (normal approximation) of per-prompt values; NaNs left out."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "low": float(values.mean() - half), "high": float(values.mean() + half), "n": int(values.size)}


def summarise(rows: list[dict], protocol: Protocol) -> dict:
    """The tables: per method AUCs (per-prompt mean and interval, and the paper's mean-curve area),
    mean Spearman per pair, consecutive-step attention correlation, localisation per phase."""
    table = {}
    for name in rows[0]["methods"] if rows else []:
        entry = {}
        for curve in ("insertion", "deletion"):
            entry[f"{curve}_auc"] = mean_interval([r["methods"][name][f"{curve}_auc"] for r in rows])
            mean_curve = np.mean([r["methods"][name][curve] for r in rows], axis=0)
            entry[f"{curve}_mean_curve"] = mean_curve.tolist()
            entry[f"{curve}_mean_curve_auc"] = metrics.auc(mean_curve)
        entry["other_distances"] = {
            distance: {f"{curve}_auc": mean_interval([r["methods"][name]["other_distances"][distance][f"{curve}_auc"] for r in rows])
                       for curve in ("insertion", "deletion")}
            for distance in protocol.distances[1:]
        }
        table[name] = entry
    pairs = rows[0]["spearman"].keys() if rows else []
    summary = {
        "protocol": vars(protocol) | {"methods": list(protocol.methods), "distances": list(protocol.distances)},
        "reference": REFERENCE if REFERENCE in table else None,
        "prompts": len(rows),
        "methods": table,
        "spearman": {pair: mean_interval([r["spearman"][pair] for r in rows]) for pair in pairs},
        "attention_consecutive_spearman": mean_interval([v for r in rows for v in r["attention_consecutive_spearman"]]),
    }
    located = [r["localisation"] for r in rows if r.get("localisation", {}).get("shape_found")]
    if located:
        phase_table = {}
        for phase in located[0]["phases"]:
            phase_table[phase] = {
                name: {key: mean_interval([loc["phases"][phase][name][key] for loc in located]) for key in ("pointing", "iou")}
                for name in located[0]["phases"][phase]
            }
        summary["localisation"] = {"prompts_with_a_shape": len(located), "phases": phase_table,
                                   "noun_iou": mean_interval([loc.get("noun_iou") for loc in located])}
    return summary


def write_results(rows: list[dict], summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "prompts": rows}, indent=1))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "distance", "insertion_auc (lower is better)", "ins_95_low", "ins_95_high",
                         "deletion_auc (higher is better)", "del_95_low", "del_95_high"])
        for name, entry in summary["methods"].items():
            by_distance = {summary["protocol"]["distances"][0]: entry} | entry["other_distances"]
            for distance, scores in by_distance.items():
                ins, dele = scores["insertion_auc"], scores["deletion_auc"]
                writer.writerow([name, distance, ins["mean"], ins["low"], ins["high"], dele["mean"], dele["low"], dele["high"]])
    plot_curves(rows, summary).save(out / "curves.png")


def plot_curves(rows: list[dict], summary: dict) -> Image.Image:
    """Mean insertion and deletion curves per method with 95 % bands."""
    figure, axes = new_figure((10, 3.6), columns=2)
    for axis, curve in zip(axes, ("insertion", "deletion")):
        for name in summary["methods"]:
            values = np.array([r["methods"][name][curve] for r in rows])
            mean = values.mean(0)
            half = 1.96 * values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
            x = np.linspace(0, 1, len(mean))
            axis.plot(x, mean, label=name, linewidth=1.3)
            axis.fill_between(x, mean - half, mean + half, alpha=0.15)
        axis.set_title(f"{curve}: distance to the real next step ({summary['protocol']['distances'][0]})", fontsize=9)
        axis.set_xlabel("fraction of latent pixels " + ("revealed" if curve == "insertion" else "removed"), fontsize=8)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return figure_to_image(figure)


def default_prompts(model_id: str, n: int) -> list[str]:
    if config.MODELS[model_id].closed_vocabulary:
        from .shapes.world import evaluation_prompts

        return [prompt for prompt, *_ in evaluation_prompts(n)]
    return list(config.PAPER_PROMPTS[:n])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m explainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=config.default_model_id(), choices=list(config.MODELS))
    parser.add_argument("--prompts", type=Path, help="a text file, one prompt per line (default: held-out shapes prompts or the paper's)")
    parser.add_argument("--num-prompts", type=int, default=20, help="how many prompts (20: about 35 min on a 2-core CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step", type=int, default=15, help="the explained step (1-based)")
    parser.add_argument("--guidance", type=float, help="default: the model's own")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--masks", type=int, default=500, help="DF-RISE masks")
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--distances", nargs="+", choices=metrics.DISTANCES, default=["1-ssim", "mse"],
                        help="the first is the main table's; the others are scored from the same states at no cost")
    parser.add_argument("--methods", nargs="+", choices=MAP_METHODS, default=list(MAP_METHODS))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm import tqdm

    model = load_model(args.model)
    protocol = Protocol(model=args.model, steps=args.steps, step=args.step, guidance=args.guidance or model.spec.guidance,
                        seed=args.seed, masks=args.masks, lime_samples=args.lime_samples, batch_size=args.batch_size,
                        distances=tuple(dict.fromkeys(args.distances)), methods=tuple(args.methods))
    prompts = args.prompts.read_text().splitlines() if args.prompts else default_prompts(args.model, args.num_prompts)
    prompts = [p.strip() for p in prompts if p.strip()][: args.num_prompts]
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    with state.split_between_processes(list(enumerate(prompts))) as mine:
        progress = tqdm(mine, desc=f"process {state.process_index}", disable=not state.is_local_main_process)
        rows = [evaluate_prompt(protocol, model, index, prompt) for index, prompt in progress]
    rows = sorted(gather_object(rows), key=lambda row: row["index"])
    summary = summarise(rows, protocol)
    if state.is_main_process:
        write_results(rows, summary, args.out)
        print(format_table(summary))
    state.wait_for_everyone()
    if torch.distributed.is_initialized():  # leave the process group cleanly (gloo aborts otherwise)
        torch.distributed.destroy_process_group()
    return summary


def format_table(summary: dict) -> str:
    """The README table: the main distance with intervals, then each other distance's mean AUCs."""
    distance, others = summary["protocol"]["distances"][0], summary["protocol"]["distances"][1:]
    header = f"| method | insertion AUC ↓ ({distance}, 95 % CI) | deletion AUC ↑ ({distance}, 95 % CI) | mean-curve ins / del |"
    header += "".join(f" ins / del ({other}) |" for other in others)
    lines = [header, "|---|---|---|---|" + "---|" * len(others)]
    for name, entry in summary["methods"].items():
        ins, dele = entry["insertion_auc"], entry["deletion_auc"]
        label = f"*{name} (reference)*" if name == summary.get("reference") else name
        line = (f"| {label} | {ins['mean']:.3f} ({ins['low']:.3f}–{ins['high']:.3f}) | {dele['mean']:.3f} ({dele['low']:.3f}–{dele['high']:.3f}) "
                f"| {entry['insertion_mean_curve_auc']:.3f} / {entry['deletion_mean_curve_auc']:.3f} |")
        for other in others:
            scores = entry["other_distances"][other]
            line += f" {scores['insertion_auc']['mean']:.3f} / {scores['deletion_auc']['mean']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


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


if __name__ == "__main__":
    main()

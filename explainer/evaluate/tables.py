"""The evaluation's tables: per-prompt rows summarised with 95 % intervals, written as JSON, CSV and
a figure of the curves, and the README's Markdown table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.lines import Line2D
from PIL import Image

from explainer import config, metrics
from explainer.evaluate.protocol import REFERENCE, Protocol
from explainer.families import family
from explainer.render.charts import figure_to_image, new_figure


UNIT = (0.0, 1.0)  # the range of an IoU, a pixel accuracy, an average precision


def mean_interval(values, bounds: tuple[float, float] | None = None) -> dict:
    """Mean and 95 % interval (normal approximation) of per-prompt values; NaNs left out. ``bounds``: the
    measure's range (an IoU's (0, 1)), which the interval is clipped to."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else 0.0
    low, high = values.mean() - half, values.mean() + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": int(values.size)}


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
        entry["other_fills"] = {
            fill: {f"{curve}_auc": mean_interval([r["methods"][name]["other_fills"][fill][f"{curve}_auc"] for r in rows])
                   for curve in ("insertion", "deletion")}
            for fill in protocol.fills[1:]
        }
        table[name] = entry
    pairs = rows[0]["spearman"].keys() if rows else []
    summary = {
        "protocol": vars(protocol) | {"methods": list(protocol.methods), "distances": list(protocol.distances),
                                      "fills": list(protocol.fills)},
        "reference": REFERENCE if REFERENCE in table else None,
        "prompts": len(rows),
        "methods": table,
        "spearman": {pair: mean_interval([r["spearman"][pair] for r in rows]) for pair in pairs},
        "attention_consecutive_spearman": mean_interval([v for r in rows for v in r["attention_consecutive_spearman"]]),
    }
    located = [r["localisation"] for r in rows if r.get("localisation", {}).get("shape_found")]
    if located:
        summary["localisation"] = localisation_summary(located)
    return summary


def localisation_summary(located: list[dict]) -> dict:
    """Pointing game and IoU per phase and at every step (each with its interval), and the shape
    noun's attention and ConceptAttention IoU, over the prompts where a shape was drawn."""
    first = located[0]
    phase_table = {phase: {name: {key: mean_interval([loc["phases"][phase][name][key] for loc in located], UNIT)
                                  for key in ("pointing", "iou")}
                           for name in first["phases"][phase]} for phase in first["phases"]}
    per_step = {name: {key: [mean_interval([loc["steps"][name][key][k] for loc in located], UNIT) for k in range(len(values))]
                       for key, values in scores.items()}
                for name, scores in first["steps"].items()}
    return {"prompts_with_a_shape": len(located), "phases": phase_table, "steps": per_step,
            "noun_iou": mean_interval([loc.get("noun_iou") for loc in located], UNIT),
            "concept_noun_iou": mean_interval([loc.get("concept_noun_iou") for loc in located], UNIT)}


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


ROW_LABELS = {"cross-attention": "attention (cross in a UNet, joint in an MM-DiT)",
              "concept-attention": "ConceptAttention (output space)", "random": "random baseline", "centre": "centred baseline"}


def model_heading(model_id: str) -> str:
    return f"{model_id.rsplit('/', 1)[-1]} ({family(config.MODELS[model_id].family).architecture})"


def _cell(interval: dict | None, digits: int = 3) -> str:
    if not interval or interval.get("mean") is None:
        return "—"
    if interval["n"] < 2:
        return f"{interval['mean']:.{digits}f}"
    return f"{interval['mean']:.{digits}f} ({interval['low']:.{digits}f}–{interval['high']:.{digits}f})"


def _methods(summaries: dict[str, dict], reference: bool = True) -> list[str]:
    """The methods of any model, in the protocol's order, the reference last (when asked for)."""
    names = dict.fromkeys(name for summary in summaries.values() for name in summary["protocol"]["methods"])
    present = {name for summary in summaries.values() for name in summary["methods"]}
    return [name for name in names if name in present] + ([REFERENCE] if reference and REFERENCE in present else [])


def format_comparison(summaries: dict[str, dict]) -> str:
    """The families side by side: insertion/deletion (the main distance with 95 % intervals, the
    others' means), pointing and IoU per phase, the shape noun's mIoU; "—" where a method does not
    apply to a model."""
    models = list(summaries)
    distance = next(iter(summaries.values()))["protocol"]["distances"][0]
    others = next(iter(summaries.values()))["protocol"]["distances"][1:]
    lines = [f"Insertion AUC ↓ and deletion AUC ↑ ({distance}; 95 % intervals), then {', '.join(others)} means.", "",
             "| method | " + " | ".join(f"{model_heading(m)} insertion ↓ | deletion ↑ | " + " | ".join(f"{o} ins / del" for o in others)
                                       for m in models) + " |",
             "|---|" + "---|---|" * len(models) + "---|" * len(others) * len(models)]
    for name in _methods(summaries):
        cells = []
        for model in models:
            entry = summaries[model]["methods"].get(name)
            if entry is None:
                cells += ["—", "—"] + ["—"] * len(others)
                continue
            cells += [_cell(entry["insertion_auc"]), _cell(entry["deletion_auc"])]
            cells += [f"{entry['other_distances'][o]['insertion_auc']['mean']:.3f} / "
                      f"{entry['other_distances'][o]['deletion_auc']['mean']:.3f}" for o in others]
        label = f"*{name} (reference)*" if name == REFERENCE else ROW_LABELS.get(name, name)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Localisation against the drawn shape: pointing game and IoU (map above its mean) at the early / middle / late step.", "",
              "| method | " + " | ".join(f"{model_heading(m)} pointing | IoU" for m in models) + " |",
              "|---|" + "---|---|" * len(models)]
    for name in _methods(summaries, reference=False):
        cells = []
        for model in models:
            table = summaries[model].get("localisation", {}).get("phases", {})
            if not table or name not in next(iter(table.values())):
                cells += ["—", "—"]
                continue
            for key in ("pointing", "iou"):
                cells.append(" / ".join("—" if table[p][name][key]["mean"] is None else f"{table[p][name][key]['mean']:.2f}"
                                        for p in table))
        lines.append(f"| {ROW_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += fills_comparison(summaries)
    lines += ["", "The shape noun's map, mean of the last third of the steps, IoU with the drawn shape (mIoU, 95 % interval):", "",
              "| map | " + " | ".join(model_heading(m) for m in models) + " |", "|---|" + "---|" * len(models)]
    for key, label in (("noun_iou", "attention of the noun"), ("concept_noun_iou", "ConceptAttention of the noun")):
        lines.append(f"| {label} | " + " | ".join(_cell(summaries[m].get("localisation", {}).get(key), 2) for m in models) + " |")
    return "\n".join(lines)


def fill_ranking(summary: dict, fill: str) -> dict[str, float]:
    """Kendall's tau between the methods' order by the main fill's AUCs and by ``fill``'s, per curve (1: the
    same order; the reference left out)."""
    from scipy.stats import kendalltau

    names = [n for n, e in summary["methods"].items() if n != REFERENCE and fill in e.get("other_fills", {})]
    taus = {}
    for curve in ("insertion", "deletion"):
        main = [summary["methods"][n][f"{curve}_auc"]["mean"] for n in names]
        other = [summary["methods"][n]["other_fills"][fill][f"{curve}_auc"]["mean"] for n in names]
        taus[curve] = float(kendalltau(main, other).statistic) if len(names) > 2 else float("nan")
    return taus


def fills_comparison(summaries: dict[str, dict]) -> list[str]:
    """Markdown lines: each other fill's AUCs beside the main one's, per model, and how far the methods'
    order changes (Kendall's tau)."""
    first = next(iter(summaries.values()))["protocol"]
    fills, distance = first.get("fills", ["blur"]), first["distances"][0]
    lines = []
    for fill in fills[1:]:
        models = list(summaries)
        lines += ["", f"Insertion ↓ / deletion ↑ ({distance}) with removed pixels filled by **{fill}** against **{fills[0]}** "
                      "(95 % intervals):", "",
                  "| method | " + " | ".join(f"{model_heading(m)} {fills[0]} ins / del | {fill} ins / del" for m in models) + " |",
                  "|---|" + "---|---|" * len(models)]
        for name in _methods(summaries):
            cells = []
            for model in models:
                entry = summaries[model]["methods"].get(name)
                if entry is None or fill not in entry.get("other_fills", {}):
                    cells += ["—", "—"]
                    continue
                other = entry["other_fills"][fill]
                cells += [f"{_cell(entry['insertion_auc'])} / {_cell(entry['deletion_auc'])}",
                          f"{_cell(other['insertion_auc'])} / {_cell(other['deletion_auc'])}"]
            label = f"*{name} (reference)*" if name == REFERENCE else ROW_LABELS.get(name, name)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        taus = {model: fill_ranking(summaries[model], fill) for model in models}
        lines += ["", "The methods' order under both fills, Kendall's tau (1: unchanged): " + "; ".join(
            f"{model_heading(m)} insertion {t['insertion']:.2f}, deletion {t['deletion']:.2f}" for m, t in taus.items()) + "."]
    return lines


def plot_timesteps(summaries: dict[str, dict]) -> Image.Image:
    """IoU with the drawn shape (the map above its mean) at every step, one panel per model, one line
    per method (dots alone where a method is scored at the three phases only)."""
    panels = {}
    for model, summary in summaries.items():
        lines = {}
        for name, scores in summary.get("localisation", {}).get("steps", {}).items():
            means = [s["mean"] for s in scores["iou"]]
            lines[ROW_LABELS.get(name, name)] = ([k + 1 for k, m in enumerate(means) if m is not None],
                                                 [m for m in means if m is not None], None in means)
        panels[model_heading(model)] = lines
    return miou_panels(panels, "step (1 = pure noise)", "mean IoU with the drawn shape")


def miou_panels(panels: dict[str, dict[str, tuple[list[int], list[float], bool]]], xlabel: str, ylabel: str) -> Image.Image:
    """One panel per title, one line per method: (steps, values, scored at a few steps only: dots alone).
    A method keeps one colour in every panel, and the legend names every method of any panel."""
    names = list(dict.fromkeys(name for lines in panels.values() for name in lines))
    colours = dict(zip(names, matplotlib.colormaps["tab10"].colors * (1 + len(names) // 10)))
    figure, axes = new_figure((5.2 * len(panels), 3.6), columns=len(panels))
    axes = np.atleast_1d(axes)
    for axis, (title, lines) in zip(axes, panels.items()):
        for name, (steps, values, sparse) in lines.items():
            style = dict(marker="o", linestyle="none") if sparse else dict(linewidth=1.4)
            axis.plot(steps, values, color=colours[name], **style)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel, fontsize=9)
        axis.set_ylabel(ylabel, fontsize=9)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    sparse_names = {name for lines in panels.values() for name, line in lines.items() if line[2]}
    handles = [Line2D([], [], color=colours[name], **(dict(marker="o", linestyle="none") if name in sparse_names else {}))
               for name in names]
    axes[-1].legend(handles, names, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return figure_to_image(figure)


def write_comparison(summaries: dict[str, dict], out: Path) -> str:
    """``comparison.md`` and ``timesteps.png`` in ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = format_comparison(summaries)
    (out / "comparison.md").write_text(text + "\n")
    plot_timesteps(summaries).save(out / "timesteps.png")
    return text

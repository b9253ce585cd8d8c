"""Zero-shot segmentation from every method's maps: pictures with exact masks, explained on the noise
trajectory of image mode (each step the picture noised to that step's level), every concept's map scored
against its mask at every step (docs/evaluation.md, "Zero-shot segmentation").

    python -m explainer.evaluate.segmentation                                # both embedded models, three sets
    python -m explainer.evaluate.segmentation --model embedded/shapes-mmdit --per-set 4
    python -m explainer.evaluate.segmentation --images DIR --masks DIR --classes classes.txt --model ID

The sets on the shapes world are rendered by ``explainer.shapes.world`` (never generated): one object,
two objects, and a confusion set (two shapes of one kind in two colours, the concepts being the colours;
two kinds in one colour; two kinds touching). A folder of images with masks (PNG, each pixel a line
number of the class list; 0 background, 255 void) runs the published protocol on any allowed model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from explainer import config, metrics
from explainer.image_mode import ImageRun
from explainer.methods import METHODS, ConceptAttention, TokenRelevance, concept_attention
from explainer.models import load_model
from explainer.render import views
from explainer.run import RunData, RunSettings
from explainer.shapes.world import COLOURS, SHAPES, generate_scene, render_scene

from .tables import UNIT, mean_interval, miou_panels

SETS = ("one object", "two objects", "confusion")
METHOD_NAMES = ("attention", "concept-attention", "relevance", "df-rise", "df-cam", "df-lime", "random", "centre")
# One map per picture, whatever the concept: these explain where the step's result depends, not a word.
CONCEPT_AGNOSTIC = ("df-rise", "df-cam", "df-lime", "random", "centre")
PHASES_ONLY = ("df-rise", "df-lime")  # many denoiser calls per map: scored at three steps only
MEASURES = ("miou", "pixel_accuracy", "average_precision")
# Published numbers on other data sets (natural photographs): beside the table, never comparable to it.
ANCHORS = (
    ("ConceptAttention (output space)", "FLUX.1-schnell", "ImageNet-Segmentation, one class per picture", "71.04"),
    ("DAAM (cross-attention)", "SDXL", "ImageNet-Segmentation, one class per picture", "64.56"),
    ("ConceptAttention (output space)", "FLUX.1", "a multi-class set (several concepts per picture)", "about 40"),
)
OUT = config.REPO_ROOT / "docs" / "results" / "segmentation"


@dataclass
class Case:
    """One picture to segment: its pixels (H, W, 3) uint8, the prompt it is explained with, and each
    concept's mask (H, W) bool; ``valid`` the pixels that count (None: all)."""

    name: str
    set: str
    image: np.ndarray
    prompt: str
    concepts: dict[str, np.ndarray]
    valid: np.ndarray | None = None


@dataclass
class Settings:
    steps: int = 10
    masks: int = 200  # DF-RISE
    lime_samples: int = 200
    batch_size: int = 64
    seed: int = 1
    methods: tuple[str, ...] = METHOD_NAMES


# --- the pictures


def shapes_cases(per_set: int, seed: int = 0) -> list[Case]:
    """``per_set`` rendered scenes of each set (SETS), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(per_set):
        one = generate_scene(seed * 1000 + index, split="any", n_shapes=1)
        cases.append(Case(f"one/{index}", "one object", one.image, one.caption, _by_word(one.shapes, "shape")))
        two = generate_scene(seed * 1000 + 500 + index, split="any", n_shapes=2)
        cases.append(Case(f"two/{index}", "two objects", two.image, two.caption, _by_word(two.shapes, "shape")))
        cases.append(_confusion(index, rng, seed * 1000 + 900 + index))
    return cases


def _by_word(shapes, attribute: str) -> dict[str, np.ndarray]:
    """Each word's mask: the union of the shapes it names."""
    masks: dict[str, np.ndarray] = {}
    for item in shapes:
        word = getattr(item, attribute)
        masks[word] = masks.get(word, np.zeros_like(item.mask)) | item.mask
    return masks


def _confusion(index: int, rng: np.random.Generator, seed: int) -> Case:
    """The hard cases, in turn: one kind in two colours (concepts: the colours), two kinds in one colour,
    two kinds touching."""
    kind = index % 3
    colours = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=2, replace=False)]
    if kind == 0:
        scene = render_scene([(colours[0], shapes[0], "big", "left"), (colours[1], shapes[0], "big", "right")], seed)
        return Case(f"confusion/{index}", "confusion", scene.image, scene.caption, _by_word(scene.shapes, "colour"))
    if kind == 1:
        scene = render_scene([(colours[0], shapes[0], "big", "left"), (colours[0], shapes[1], "big", "right")], seed)
    else:  # touching: two big shapes side by side, overlapping a little; the second is cut from the first
        scene = render_scene([(colours[0], shapes[0], "big", "left"), (colours[1], shapes[1], "big", "right")], seed,
                             centres=[(24.0, 32.0), (40.0, 32.0)])
    return Case(f"confusion/{index}", "confusion", scene.image, scene.caption, _by_word(scene.shapes, "shape"))


def folder_cases(images: Path, masks: Path, classes: Path) -> list[Case]:
    """The published protocol's pictures: every image in ``images`` with the PNG of the same name in ``masks``
    (each pixel the line number of its class in ``classes``; 0 background, 255 void). The prompt names
    the picture's classes; each class present is a concept."""
    names = [line.strip() for line in classes.read_text(encoding="utf-8").splitlines() if line.strip()]
    cases = []
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")):
        mask_path = masks / f"{path.stem}.png"
        if not mask_path.is_file():
            raise ValueError(f"No mask for {path.name}: expected {mask_path}.")
        labels = np.asarray(Image.open(mask_path))
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{mask_path.name} is {labels.shape[1]}×{labels.shape[0]}, its image {image.shape[1]}×{image.shape[0]}.")
        present = [int(v) for v in np.unique(labels) if v not in (0, 255)]
        if any(v >= len(names) for v in present):
            raise ValueError(f"{mask_path.name} has class {max(present)}, but {classes.name} names {len(names)} classes.")
        concepts = {names[v]: labels == v for v in present}
        if concepts:
            cases.append(Case(path.stem, "folder", image, " and ".join(f"a {c}" for c in concepts), concepts, labels != 255))
    return cases


# --- maps and scores


def concept_maps(name: str, model, run: RunData, step: int, concepts: list[str], settings: Settings) -> dict[str, np.ndarray]:
    """Method ``name``'s map of every concept at ``step`` (H_lat, W_lat)."""
    words = {c: run.tokens.find(c) for c in concepts}  # each concept's word index in the prompt
    if name == "attention":  # the recorded maps, all layers and heads (DAAM's aggregate), the word's pieces summed
        return {c: views.word_map(run, i, [run.records[step - 1]]) for c, i in words.items()}
    if name == "relevance":
        found = TokenRelevance().explain(model, run, step)
        return {c: found.token_maps[f"{i}:{run.tokens.words[i].text}"] for c, i in words.items()}
    if name == "concept-attention":  # the concepts compete with the other words of their kind for every cell
        rivals = [w for w in (*SHAPES, *COLOURS) if w not in concepts] if config.MODELS[model.id].closed_vocabulary else []
        found = ConceptAttention(concepts=(*concepts, *rivals[:3])).explain(model, run, step)
        return {c: found.token_maps[f"{i}:{c}"] for i, c in enumerate(concepts)}
    options = {"df-rise": dict(n_masks=settings.masks, batch_size=settings.batch_size),
               "df-lime": dict(n_samples=settings.lime_samples, batch_size=settings.batch_size),
               "random": dict(seed=settings.seed)}.get(name, {})
    saliency = METHODS[name](**options).explain(model, run, step).saliency
    return dict.fromkeys(concepts, saliency)


def applies(name: str, model) -> bool:
    return name != "concept-attention" or model.family.name in concept_attention.FAMILIES


def scored_steps(name: str, steps: int) -> list[int]:
    if name in PHASES_ONLY:
        return sorted({max(1, round(steps * f)) for f in (0.2, 0.5, 0.85)})
    return list(range(1, steps + 1))


def segment_case(model, case: Case, settings: Settings) -> dict:
    """Every method's scores for every concept of one picture, at each step it is scored at."""
    spec = model.spec
    run_settings = RunSettings(prompt=case.prompt, steps=settings.steps, guidance=config.DEFAULTS.image_guidance,
                               seed=settings.seed, width=spec.width, height=spec.height)
    picture = Image.fromarray(case.image).resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    run = ImageRun(model, run_settings, np.asarray(picture), "noise").run_all().data
    size = (spec.height, spec.width)
    masks = {c: _on_size(m, size) for c, m in case.concepts.items()}
    valid = None if case.valid is None else _on_size(case.valid, size)
    counted = np.ones(size, bool) if valid is None else valid
    concepts = [c for c, m in masks.items() if m[counted].any() and not m[counted].all()]
    scores: dict[str, dict] = {}
    for name in settings.methods:
        if not applies(name, model):
            continue
        per_step = {}
        for step in scored_steps(name, settings.steps):
            maps = concept_maps(name, model, run, step, concepts, settings)
            per_step[step] = {c: metrics.segmentation_scores(maps[c], masks[c], valid) for c in concepts}
        scores[name] = per_step
    return {"name": case.name, "set": case.set, "prompt": case.prompt, "concepts": concepts, "scores": scores}


def _on_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)) > 127


# --- summaries and tables


def summarise(rows: list[dict], steps: int) -> dict:
    """Per set and method: each measure's mean over pictures and concepts, with a 95 % interval, at the
    late phase (the step at 85 % of the run, where every method is scored) and its best step; and the
    mIoU at every step (the curve)."""
    late = max(1, round(steps * 0.85))
    summary: dict[str, dict] = {}
    for set_name in [*SETS, "folder"]:
        chosen = [row for row in rows if row["set"] == set_name]
        if not chosen:
            continue
        methods = {}
        for name in dict.fromkeys(n for row in chosen for n in row["scores"]):
            def values(step, measure):
                return [s[measure] for row in chosen for s in row["scores"][name].get(step, {}).values()]
            curve = {step: float(np.mean(values(step, "miou"))) for step in scored_steps(name, steps) if values(step, "miou")}
            best = max(curve, key=curve.get)
            methods[name] = {"late": {m: mean_interval(values(late, m), UNIT) for m in MEASURES}, "late_step": late,
                             "best_step": best, "best": {m: mean_interval(values(best, m), UNIT) for m in MEASURES},
                             "miou_by_step": curve}
        summary[set_name] = {"pictures": len(chosen), "concepts": sum(len(r["concepts"]) for r in chosen), "methods": methods}
    return summary


def format_table(results: dict[str, dict]) -> str:
    """Markdown: per model and set, each method's mIoU, pixel accuracy and mAP (× 100, 95 % intervals) at
    the late step, and its best step's mIoU; then the anchors."""
    lines = []
    for model_id, summary in results.items():
        lines.append(f"### {model_id} ({config.MODELS[model_id].family if model_id in config.MODELS else '?'} family)\n")
        for set_name, entry in summary.items():
            lines += [f"**{set_name}** ({entry['pictures']} pictures, {entry['concepts']} concepts)\n",
                      "| method | mIoU | pixel accuracy | mAP | best step: mIoU |", "| --- | --- | --- | --- | --- |"]
            ranked = sorted(entry["methods"].items(), key=lambda kv: -kv[1]["late"]["miou"]["mean"])
            for name, scores in ranked:
                cells = [_cell(scores["late"][m]) for m in MEASURES]
                lines.append(f"| {name} | {' | '.join(cells)} | {scores['best_step']}: {_cell(scores['best']['miou'])} |")
            lines.append("")
    lines += ["Published numbers, **other data sets** (natural photographs; not comparable to the rows above):\n",
              "| method | model | data | mIoU |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {model} | {data} | {value} |" for m, model, data, value in ANCHORS]
    return "\n".join(lines) + "\n"


def _cell(interval: dict) -> str:
    return f"{100 * interval['mean']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def plot_curves(results: dict[str, dict]) -> Image.Image:
    """mIoU at every step, one panel per model, one line per method (the sets pooled; dots alone where a
    method is scored at three steps only)."""
    panels = {}
    for model_id, summary in results.items():
        series: dict[str, dict[int, list[float]]] = {}
        for entry in summary.values():
            for name, scores in entry["methods"].items():
                for step, value in scores["miou_by_step"].items():
                    series.setdefault(name, {}).setdefault(int(step), []).append(value)
        panels[model_id] = {
            name: (sorted(by_step), [float(np.mean(by_step[s])) for s in sorted(by_step)], name in PHASES_ONLY)
            for name, by_step in series.items()}
    return miou_panels(panels, "step (1 = the most noise)", "segmentation mIoU")


# --- the command


def run_model(model_id: str, cases: list[Case], settings: Settings, progress) -> dict:
    model = load_model(model_id)
    rows = []
    for case in cases:
        rows.append(segment_case(model, case, settings))
        progress.update(1)
    return {"rows": rows, "summary": summarise(rows, settings.steps)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=None, help="model ids (default: every embedded model with weights)")
    parser.add_argument("--per-set", type=int, default=16, help="rendered pictures per set (default 16)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--masks", type=int, default=Settings.masks, help="DF-RISE masks")
    parser.add_argument("--lime-samples", type=int, default=Settings.lime_samples)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    parser.add_argument("--images", type=Path, help="the published protocol: a folder of images ...")
    parser.add_argument("--masks-dir", "--mask-folder", dest="mask_folder", type=Path, help="... their masks (PNG) ...")
    parser.add_argument("--classes", type=Path, help="... and the class names, one per line (line 0: background)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rewrite", action="store_true",
                        help="run nothing: summarise --out's results.json again and rewrite its table and plot")
    args = parser.parse_args(argv)
    if args.rewrite:
        return rewrite(args.out)
    models = args.model or config.embedded_models_present()
    for model_id in models:
        config.model_spec(model_id)  # only the models the config allows
    if args.images:
        if not (args.mask_folder and args.classes):
            parser.error("--images needs --masks-dir and --classes")
        cases = folder_cases(args.images, args.mask_folder, args.classes)
    else:
        cases = shapes_cases(args.per_set)
    settings = Settings(steps=args.steps, masks=args.masks, lime_samples=args.lime_samples, methods=tuple(args.methods))
    results = {}
    with tqdm(total=len(cases) * len(models), desc="segmenting", unit="picture") as progress:
        for model_id in models:
            results[model_id] = run_model(model_id, cases, settings, progress)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"settings": vars(settings), "models": results}, indent=1, default=str))
    write_tables({model_id: result["summary"] for model_id, result in results.items()}, args.out)
    return results


def write_tables(summaries: dict[str, dict], out: Path) -> None:
    table = format_table(summaries)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot_curves(summaries).save(out / "timesteps.png")
    print(table)


def rewrite(out: Path) -> dict:
    """The summaries of ``out``/results.json computed again from its rows (JSON keys the steps as
    strings), the table and the plot rewritten."""
    stored = json.loads((out / "results.json").read_text())
    steps = int(stored["settings"]["steps"])
    for result in stored["models"].values():
        for row in result["rows"]:
            row["scores"] = {name: {int(step): scores for step, scores in per_step.items()}
                             for name, per_step in row["scores"].items()}
        result["summary"] = summarise(result["rows"], steps)
    (out / "results.json").write_text(json.dumps(stored, indent=1, default=str))
    write_tables({model_id: result["summary"] for model_id, result in stored["models"].items()}, out)
    return stored["models"]


if __name__ == "__main__":
    main()

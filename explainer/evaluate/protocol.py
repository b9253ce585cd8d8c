"""The evaluation's protocol: its settings, the maps it scores, and every number for one prompt
(docs/evaluation.md)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from explainer import config, metrics
from explainer.methods import METHODS, variant
from explainer.maps import normalise
from explainer.render import views
from explainer.run import InstrumentedRun, RunData, RunSettings
from explainer.shapes.truth import noun_iou, shape_grid
from explainer.shapes.world import evaluation_prompts

MAP_METHODS = ("df-rise", "df-rise-structure", "df-rise-paper", "df-cam", "df-cam-paper", "df-cam-gradcam", "df-cam-hirescam",
               "df-cam-abs", "df-lime", "cross-attention", "relevance", "relevance-paper", "random", "centre")
# Each a method variant (``explainer.methods.VARIANTS``: a method's defaults, or the paper's rules and
# other options beside them), except "cross-attention", the recorded maps themselves.
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
    chosen = variant(name)
    sizes = {  # the protocol's sizes, under the variant's own options
        "df-rise": dict(n_masks=protocol.masks, batch_size=protocol.batch_size, mode="next-latent"),
        "df-lime": dict(n_samples=protocol.lime_samples, batch_size=protocol.batch_size),
        "random": dict(seed=run.settings.seed),
    }.get(chosen.method, {})
    return METHODS[chosen.method](**(sizes | chosen.options)).explain(model, run, step).saliency


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
            result["phases"][phase][name] = {"pointing": metrics.pointing_game(saliency, mask),
                                                 "iou": metrics.iou(saliency, mask)}
    if (score := noun_iou(run, mask)) is not None:
        result["noun_iou"] = score
    return result


def default_prompts(model_id: str, n: int) -> list[str]:
    """The held-out shapes prompts on the shapes world, else the paper's prompts; the first n."""
    if config.MODELS[model_id].closed_vocabulary:
        return [prompt for prompt, *_ in evaluation_prompts(n)]
    return list(config.PAPER_PROMPTS[:n])

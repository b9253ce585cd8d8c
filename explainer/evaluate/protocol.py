"""The evaluation's protocol: its settings, the maps it scores, and every number for one prompt
(docs/evaluation.md)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from explainer import config, metrics
from explainer.methods import METHODS, ConceptAttention, concept_attention, variant
from explainer.maps import normalise
from explainer.render import views
from explainer.run import InstrumentedRun, RunData, RunSettings
from explainer.shapes.truth import noun_iou, shape_grid
from explainer.shapes.world import SHAPES, evaluation_prompts

MAP_METHODS = ("df-rise", "df-rise-structure", "df-rise-paper", "df-cam", "df-cam-paper", "df-cam-gradcam", "df-cam-hirescam",
               "df-cam-abs", "df-lime", "cross-attention", "concept-attention", "relevance", "relevance-paper", "random", "centre")
# Each a method variant (``explainer.methods.VARIANTS``: a method's defaults, or the paper's rules and
# other options beside them), except the attention maps: "cross-attention", the recorded maps
# themselves (cross-attention in a UNet, the image-to-text block of joint attention in an MM-DiT),
# and "concept-attention", ConceptAttention's output-space map of the prompt's shape noun against
# the other shape nouns (MM-DiT only).
DEFAULT_METHODS = ("df-rise", "df-cam", "df-lime", "cross-attention", "concept-attention", "relevance", "random", "centre")
ATTENTION_MAPS = ("cross-attention", "concept-attention")
# A map that knows the answer, as an upper reference on the shapes world: the drawn shape's own pixels.
REFERENCE = "shape-mask"
# Localisation is scored at every step, except for these (each map takes many denoiser calls):
# at the three phases only, unless the protocol's ``every_step`` names them.
PHASES_ONLY = ("df-rise", "df-rise-structure", "df-rise-paper", "df-lime", "df-lime-paper")


def applies(name: str, model) -> bool:
    """Whether method ``name`` is defined on ``model`` (ConceptAttention needs joint attention)."""
    return name != "concept-attention" or model.family.name in concept_attention.FAMILIES


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
    every_step: tuple[str, ...] = ()  # methods of PHASES_ONLY localised at every step all the same
    fills: tuple[str, ...] = ("blur", "inpaint")  # insertion/deletion's fills: the first is the main table's

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
    if name == "concept-attention":
        return normalise(ConceptAttention(concepts=shape_concepts(run)).explain(model, run, step).saliency)
    chosen = variant(name)
    sizes = {  # the protocol's sizes, under the variant's own options
        "df-rise": dict(n_masks=protocol.masks, batch_size=protocol.batch_size, mode="next-latent"),
        "df-lime": dict(n_samples=protocol.lime_samples, batch_size=protocol.batch_size),
        "random": dict(seed=run.settings.seed),
    }.get(chosen.method, {})
    return METHODS[chosen.method](**(sizes | chosen.options)).explain(model, run, step).saliency


def shape_concepts(run: RunData) -> tuple[str, ...]:
    """ConceptAttention's concepts on the shapes world: the prompt's first shape noun, then the other
    shape nouns, which compete with it for every latent cell (the vocabulary has no "background")."""
    named = [word.text for word in run.tokens.words if word.text in SHAPES]
    return tuple(dict.fromkeys([*named[:1], *SHAPES]))


def evaluate_prompt(protocol: Protocol, model, index: int, prompt: str) -> dict:
    """Every number for one prompt: AUCs and curves per method, correlations, localisation."""
    settings = RunSettings(prompt=prompt, seed=protocol.seed + index, steps=protocol.steps, guidance=protocol.guidance,
                           width=model.spec.width, height=model.spec.height)
    run = InstrumentedRun(model, settings).run_all().data
    step = protocol.step
    maps = {name: make_map(name, protocol, model, run, step) for name in protocol.methods if applies(name, model)}
    row = {"model": model.id, "index": index, "prompt": prompt, "seed": settings.seed, "step": step, "methods": {}}
    scored_maps = dict(maps)
    if config.MODELS[model.id].closed_vocabulary:
        scored_maps[REFERENCE] = make_map(REFERENCE, protocol, model, run, step)
    for name, saliency in scored_maps.items():
        scored = metrics.insertion_deletion_by_distance(model, run, step, saliency, protocol.distances, protocol.batch_size,
                                                        protocol.fills[0])
        row["methods"][name] = scored[protocol.distance] | {
            "other_distances": {d: scored[d] for d in protocol.distances[1:]}, "other_fills": {}}
        for fill in protocol.fills[1:]:  # the same map, removed pixels filled otherwise (the main distance only)
            other = metrics.insertion_deletion(model, run, step, saliency, protocol.distance, protocol.batch_size, fill)
            row["methods"][name]["other_fills"][fill] = {key: other[key] for key in ("insertion_auc", "deletion_auc")}
    row["spearman"] = {f"{a} | {b}": metrics.spearman(maps[a], maps[b]) for a, b in combinations(maps, 2)}
    attention = [make_map("cross-attention", protocol, model, run, k) for k in range(1, len(run.records) + 1)]
    row["attention_consecutive_spearman"] = [metrics.spearman(a, b) for a, b in zip(attention, attention[1:])]
    if config.MODELS[model.id].closed_vocabulary:
        row["localisation"] = localisation(protocol, model, run, maps)
    return row


def phases(steps: int) -> dict[str, int]:
    return {"early": max(1, round(steps * 0.2)), "middle": max(1, round(steps * 0.5)), "late": max(1, round(steps * 0.85))}


def localisation(protocol: Protocol, model, run: RunData, maps_at_step: dict) -> dict:
    """Pointing game and IoU of each map against the drawn shape at every step (``None`` at the steps
    a method of PHASES_ONLY is not scored), the same at early, middle and late steps, and the shape
    noun's attention and ConceptAttention IoU (mean map of the last third of the steps), as DAAM reports."""
    mask = shape_grid(run)
    if not mask.any() or mask.all():
        return {"shape_found": False}
    count = len(run.records)
    phase_steps = phases(count)
    per_step, concept_maps = {}, []
    for name in maps_at_step:
        every = name not in PHASES_ONLY or name in protocol.every_step
        scores = {"pointing": [None] * count, "iou": [None] * count}
        for step in range(1, count + 1) if every else sorted(set(phase_steps.values())):
            saliency = maps_at_step[name] if step == protocol.step else make_map(name, protocol, model, run, step)
            scores["pointing"][step - 1] = metrics.pointing_game(saliency, mask)
            scores["iou"][step - 1] = metrics.iou(saliency, mask)
            if name == "concept-attention" and step > count - max(1, count // 3):
                concept_maps.append(saliency)
        per_step[name] = scores
    result = {"shape_found": True, "steps": per_step,
              "phases": {phase: {name: {key: scores[key][step - 1] for key in scores} for name, scores in per_step.items()}
                         for phase, step in phase_steps.items()}}
    if (score := noun_iou(run, mask)) is not None:
        result["noun_iou"] = score
    if concept_maps:  # the shape noun's ConceptAttention map, on the same footing as its attention
        result["concept_noun_iou"] = metrics.iou(np.mean(concept_maps, axis=0), mask)
    return result


def default_prompts(model_id: str, n: int) -> list[str]:
    """The held-out shapes prompts on the shapes world, else the paper's prompts; the first n."""
    if config.MODELS[model_id].closed_vocabulary:
        return [prompt for prompt, *_ in evaluation_prompts(n)]
    return list(config.PAPER_PROMPTS[:n])

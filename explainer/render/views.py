"""From records to what a person looks at: per-word maps, overlays and step summaries.

Everything here reads stored records; nothing recomputes the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..methods.relevance import attention_scores
from ..run import RunData, StepRecord
from .pictures import for_display, overlay, step_picture

START, END, PADDING = "<start>", "<end>", "<padding>"


def token_labels(run: RunData, include_special: bool = False) -> list[str]:
    """The words of the prompt, and with ``include_special`` the start (where the encoder has one), end
    and padding tokens."""
    words = run.tokens.word_texts
    start = [START] if run.tokens.has_start else []
    return [*start, *words, END, PADDING] if include_special else list(words)


def _rows(run: RunData, label_index: int, include_special: bool) -> list[int]:
    """Rows of ``StepRecord.attention`` that make up one label (a word's BPE pieces summed)."""
    tokens = run.tokens
    if not include_special:
        return list(tokens.words[label_index].positions)
    if not tokens.has_start:  # T5: the labels start with the words
        label_index += 1
    if label_index == 0:
        return [tokens.start_position]
    if label_index <= len(tokens.words):
        return list(tokens.words[label_index - 1].positions)
    if label_index == len(tokens.words) + 1:
        return [tokens.end_position]
    return [tokens.stored_positions]  # the summed padding row


def word_map(
    run: RunData,
    label_index: int,
    steps: Sequence[StepRecord] | None = None,
    include_special: bool = False,
    groups: Sequence[str] | None = None,
) -> np.ndarray:
    """Attention map (H_lat, W_lat) of one word, averaged over ``steps`` (default: all).

    With ``groups`` (labels of ``layer_groups(run)``, e.g. "up 16×16") the map averages the
    layers of those groups only, each layer weighing the same as in the all-layer map; this
    needs a run made with ``per_group=True``.
    """
    labels = token_labels(run, include_special)
    if not 0 <= label_index < len(labels):
        raise ValueError(f"token index must be in [0, {len(labels) - 1}], got {label_index}.")
    steps = list(run.records if steps is None else steps)
    if not steps:
        raise ValueError("No steps recorded yet.")
    rows = _rows(run, label_index, include_special)
    weights = _group_weights(run, groups)
    total = np.zeros(run.latent_size, np.float32)
    for record in steps:
        sources = [(record.attention, 1)] if not weights else [(record.group_attention[g], n) for g, n in weights.items()]
        for source, weight in sources:
            total += weight * _resize(source[rows].astype(np.float32).sum(0), run.latent_size)
    return total / (len(steps) * (sum(weights.values()) if weights else 1))


def _group_weights(run: RunData, groups: Sequence[str] | None) -> dict[str, int]:
    """Each chosen group's layer count (a group's map is its layers' mean)."""
    if not groups:
        return {}
    known = layer_groups(run)
    if not known:
        raise ValueError("Per-group maps were not recorded; run with per_group=True.")
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(f"Unknown layer groups {unknown}; this model has {list(known)}.")
    return {g: len(known[g]) for g in dict.fromkeys(groups)}


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if values.shape == tuple(size):
        return values
    image = Image.fromarray(values.astype(np.float32))
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def word_overlays(
    run: RunData,
    record: StepRecord,
    view: str = "prediction",
    opacity: float = 0.8,
    include_special: bool = False,
    max_side: int | None = None,
    shared_scale: bool | None = None,
) -> list[tuple[Image.Image, str]]:
    """One overlay per word of the prompt at one step; at most ``max_side`` pixels a side when given
    (6 words of a 512 px picture: ~105 ms to draw, at 256 px ~22 ms).

    ``shared_scale=True``: every word on one scale, from 0 to the largest attention share of any
    word anywhere, so a weakly attended word looks weak; ``False``: each word from 0 to its own
    peak; ``None``: each word min-max (the paper's). The caption is the word and, on the first two
    scales, its peak share of a spot's attention.
    """
    picture = for_display(step_picture(record, view), min_side=128)
    if max_side is not None and max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    labels = token_labels(run, include_special)
    maps = [word_map(run, i, [record], include_special) for i in range(len(labels))]
    if shared_scale is None:
        return [(overlay(picture, values, opacity), label) for values, label in zip(maps, labels)]
    top = max((float(values.max()) for values in maps), default=1.0)
    return [
        (overlay(picture, values, opacity, scale=top if shared_scale else float(values.max())), f"{label} · peak {values.max():.0%}")
        for values, label in zip(maps, labels)
    ]


# what a concept chart's axis says, per score (relevance.attention_scores' and token relevance)
SCORE_AXES = {"peak": "peak attention (1: the strongest word)", "mass": "attention mass (min-max per step)",
              "relevance": "relevance (min-max per step)"}


def concept_series(run: RunData, score: str = "peak") -> dict[str, list[float]]:
    """The quick concept score (``relevance.attention_scores``) of every word at every recorded step
    (one list per word)."""
    per_step = [attention_scores(run, record, score) for record in run.records]
    return {label: [scores[label] for scores in per_step] for label in (per_step[0] if per_step else {})}


def latent_paths(runs: Sequence[RunData]) -> tuple[list[np.ndarray], np.ndarray]:
    """The runs' latents, from the starting noise through every step to the last, projected to 2-D
    by one PCA fitted on all of them (so runs compared share the plane): one (steps + 1, 2) array per
    run, and the share of the variance each of the two axes keeps."""
    from sklearn.decomposition import PCA

    paths = [np.stack([r.latents.float().numpy().ravel() for r in run.records] + [run.records[-1].next_latents.float().numpy().ravel()])
             for run in runs if run.records]
    if not paths:
        raise ValueError("No steps recorded yet.")
    stacked = np.concatenate(paths)
    pca = PCA(n_components=min(2, *stacked.shape)).fit(stacked)
    projected = [pca.transform(path) for path in paths]
    if projected[0].shape[1] == 1:  # a single point: a second axis of zeros
        projected = [np.pad(path, ((0, 0), (0, 1))) for path in projected]
    return projected, np.pad(pca.explained_variance_ratio_, (0, 2 - len(pca.explained_variance_ratio_)))


def layer_groups(run: RunData) -> dict[str, list[str]]:
    """Cross-attention layer keys by group (block kind and resolution), e.g. "down 16×16" -> [keys];
    empty for a run made without ``per_group``."""
    return run.attention_groups


def step_summary(run: RunData, record: StepRecord) -> dict:
    """JSON-ready facts of one step (for the API and the status line)."""
    return {
        "seed": run.settings.seed,  # the seed used (a random one when -1 was asked)
        "step": record.index,
        "total": record.total,
        "timestep": record.timestep,
        "next_timestep": record.next_timestep,
        "sigma": record.sigma,
        "alpha_bar": record.alpha_bar,
        "token_scores": attention_scores(run, record),
    }

"""Which quick concept score reads right on the embedded model: for scenes of the shapes world, how
often a content word (colour, size, shape, place) scores above a function word at a step, and how
often the run's top word is the shape noun, for each score of ``relevance.attention_scores``.

Usage: python scripts/concept_scores.py [--scenes 30] [--steps 10]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from explainer import config  # noqa: E402
from explainer.methods.relevance import ATTENTION_SCORES, attention_scores  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.run import InstrumentedRun, RunSettings  # noqa: E402
from explainer.shapes.world import SHAPES, generate_scene  # noqa: E402

FUNCTION_WORDS = {"a", "an", "the", "on", "at", "in", "and"}


def content_above_function(scores: list[float], words: list[str]) -> float:
    """P(a content word's score > a function word's), ties counting half; NaN without both kinds."""
    content = [s for s, w in zip(scores, words) if w not in FUNCTION_WORDS]
    function = [s for s, w in zip(scores, words) if w in FUNCTION_WORDS]
    if not content or not function:
        return float("nan")
    return float(np.mean([(c > f) + 0.5 * (c == f) for c in content for f in function]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    model = load_model(config.EMBEDDED_MODEL_ID)
    pairs = {score: [] for score in ATTENTION_SCORES}
    tops = {score: [] for score in ATTENTION_SCORES}
    for seed in range(args.scenes):
        caption = generate_scene(np.random.default_rng(1000 + seed)).caption
        settings = RunSettings(prompt=caption, steps=args.steps, guidance=5.0, width=64, height=64, seed=seed)
        run = InstrumentedRun(model, settings).run_all().data
        words = run.tokens.word_texts
        for score in ATTENTION_SCORES:
            per_step = np.array([list(attention_scores(run, record, score).values()) for record in run.records])
            pairs[score] += [content_above_function(list(step), words) for step in per_step]
            tops[score].append(words[int(np.argmax(per_step.mean(0)))] in SHAPES)
    for score in ATTENTION_SCORES:
        print(f"{score:5s} content word above a function word at a step: {np.nanmean(pairs[score]):.3f}; "
              f"the run's top word is the shape noun: {np.mean(tops[score]):.0%} of {args.scenes} scenes")


if __name__ == "__main__":
    main()

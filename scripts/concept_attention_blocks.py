"""Why does ConceptAttention lose to a centred map on the embedded MM-DiT? (issue 23)

On held-out prompts of the shapes world, at the evaluation's step, the shape concepts (circle, square,
triangle) ride every joint-attention block, and each block's output-space map is scored against the
drawn shape: how often the prompt's noun wins the shape's cells (chance 1/3), its map's IoU with the
shape (above its mean), how peaked the shares are (1/3: flat), and how alike the concepts' states are
as they enter the block (mean pairwise cosine). The records' text share (how much each image token
attends to the text at all) is scored beside them. Then two tests of where the prompt is read: the
word states of one prompt with the pooled vector of another (or of the empty prompt), and another shape
noun's states at the noun's own row, or at the rows after the last word.

    python scripts/concept_attention_blocks.py --prompts 8 --pairs 40 > docs/results/concept-attention.txt
"""

from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/...

from explainer import metrics  # noqa: E402
from explainer.evaluate.protocol import Protocol, default_prompts  # noqa: E402
from explainer.methods import concept_attention as ca  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.replay import raw_prediction, step_inputs  # noqa: E402
from explainer.run import InstrumentedRun, RunSettings  # noqa: E402
from explainer.shapes.checker import detect  # noqa: E402
from explainer.shapes.quality import DEFAULT_STEPS, FIRST_SEED  # noqa: E402
from explainer.shapes.truth import shape_grid  # noqa: E402
from explainer.shapes.world import SHAPES, evaluation_prompts  # noqa: E402


class _Watched(ca._ConceptStream):
    """The concept stream, also keeping how alike the concepts' states are entering each block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alike: list[float] = []

    def _ride(self, block, index):
        states = F.normalize(self.states.float(), dim=-1)
        self.alike.append(float(np.mean([states[a] @ states[b] for a, b in combinations(range(len(states)), 2)])))
        super()._ride(block, index)


def per_block(model, run, step: int, noun: int) -> list[dict]:
    inputs = step_inputs(model, run, step)
    blocks = list(model.denoiser.transformer_blocks)
    stream = _Watched(ca._concept_states(model, SHAPES), inputs.conditioning.halves - 1, run.latent_size, model.family,
                      set(range(len(blocks))))
    with torch.no_grad(), stream.riding(blocks):
        raw_prediction(model, inputs, inputs.latents)
    mask = shape_grid(run)
    rows = []
    for maps, alike in zip(stream.output_maps, stream.alike):
        maps = maps.numpy()
        rows.append({"noun wins": float((maps.argmax(0) == noun)[mask].mean()), "iou": metrics.iou(maps[noun], mask),
                     "peak": float(maps.max(0).mean()), "alike": alike})
    mean = np.mean([m.numpy() for m in stream.output_maps], axis=0)
    rows.append({"noun wins": float((mean.argmax(0) == noun)[mask].mean()), "iou": metrics.iou(mean[noun], mask),
                 "peak": float(mean.max(0).mean()), "alike": float("nan")})  # printed as "—"
    rows.append({"iou": metrics.iou(run.records[step - 1].text_share.astype(np.float32), mask)})
    return rows


def which_channel(model, pairs: int) -> dict[str, dict[str, float]]:
    """Pictures made from one prompt's word states with the pooled vector (SD 3 modulates every block
    with it) of another prompt, or of the empty prompt: of the attributes where the two prompts differ,
    the share drawn as the words say, as the pooled vector's prompt says, or neither."""
    prompts = evaluation_prompts(2 * pairs)
    keys = ("colour", "shape", "place")
    counts = {(source, key): {"words": 0, "pooled": 0, "neither": 0} for source in ("another prompt", "the empty prompt")
              for key in keys}
    for index in range(pairs):
        (words_prompt, *words_truth), (other_prompt, *other_truth) = prompts[2 * index], prompts[2 * index + 1]
        words = _encoded(model, words_prompt)
        for source, pooled_prompt, truth in (("another prompt", other_prompt, other_truth), ("the empty prompt", "", None)):
            pooled = _encoded(model, pooled_prompt)
            found = _drawn(model, index, words[0], words[1], pooled[2], pooled[3])
            for position, key in enumerate(keys):
                said, other = words_truth[position], (truth or [None] * 3)[position]
                if said == other:
                    continue
                drawn = getattr(found, key) if found else None
                counts[source, key]["words" if drawn == said else "pooled" if drawn == other else "neither"] += 1
    return {f"{key}, pooled vector of {source}": {k: v / max(1, sum(c.values())) for k, v in c.items()}
            for (source, key), c in counts.items()}


def where_the_noun_is_read(model, prompts: int) -> dict[str, dict[str, float]]:
    """Pictures of a prompt whose text states are those of the same prompt with another shape noun at
    some rows only: the noun's own row, or the rows after the last word (end-of-text and padding, which
    a causal text encoder makes summaries of the whole prompt). The share of pictures drawing the
    prompt's shape, the other noun's, or neither."""
    counts = {rows: {"the prompt's": 0, "the other noun's": 0, "neither": 0} for rows in ("the noun's row", "the rows after the last word")}
    for index, (prompt, _, shape, _) in enumerate(evaluation_prompts(prompts)):
        other = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        words = model.family.tokenize(model.pipe, prompt).words
        noun = next(w.positions for w in words if w.text == shape)
        after = range(words[-1].positions[-1] + 1, model.pipe.tokenizer.model_max_length)
        own, swapped = _encoded(model, prompt), _encoded(model, prompt.replace(shape, other))
        for name, rows in (("the noun's row", list(noun)), ("the rows after the last word", list(after))):
            states = own[0].clone()
            states[:, rows] = swapped[0][:, rows]
            found = _drawn(model, index, states, *own[1:])
            drawn = found.shape if found else None
            counts[name]["the prompt's" if drawn == shape else "the other noun's" if drawn == other else "neither"] += 1
    return {name: {k: v / prompts for k, v in c.items()} for name, c in counts.items()}


def _encoded(model, prompt: str):
    """SD 3's (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) of ``prompt``, the empty negative."""
    return model.pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=True, negative_prompt="")


def _drawn(model, index: int, states, negative_states, pooled, negative_pooled):
    """What the checker finds in the picture the pipeline makes from these text states (seed 1000 + index,
    as the quality report's), or None."""
    with torch.no_grad():
        image = model.pipe(prompt_embeds=states, negative_prompt_embeds=negative_states, pooled_prompt_embeds=pooled,
                           negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=DEFAULT_STEPS,
                           guidance_scale=model.spec.guidance, generator=torch.Generator().manual_seed(FIRST_SEED + index),
                           height=model.spec.height, width=model.spec.width, output_type="np").images[0]
    return detect(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded/shapes-mmdit")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=40, help="prompt pairs of the words-or-pooled test")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    if model.family.name != "sd3":  # the swaps below follow SD 3's text layout: CLIP rows first, then T5's
        raise SystemExit(f"{args.model} is of the {model.family.name!r} family; this script reads SD 3's (an MM-DiT with CLIP).")
    protocol = Protocol(args.model, guidance=model.spec.guidance)
    table = []
    for index, prompt in enumerate(default_prompts(args.model, args.prompts)):
        settings = RunSettings(prompt=prompt, seed=protocol.seed + index, steps=protocol.steps, guidance=protocol.guidance,
                               width=model.spec.width, height=model.spec.height)
        run = InstrumentedRun(model, settings).run_all().data
        noun = next(SHAPES.index(w.text) for w in run.tokens.words if w.text in SHAPES)
        table.append(per_block(model, run, protocol.step, noun))
    blocks = len(table[0]) - 2
    print(f"{args.model}, {len(table)} prompts, step {protocol.step} of {protocol.steps}; concepts {', '.join(SHAPES)}")
    print("| block | noun wins the shape's cells (chance 0.33) | IoU of the noun's map | peak share (flat 0.33) | concepts alike (cosine) |")
    print("|---|---|---|---|---|")
    names = [str(b) for b in range(blocks)] + ["mean of the blocks (ConceptAttention's map)"]
    for b, name in enumerate(names):
        cells = [np.mean([row[b][key] for row in table]) for key in ("noun wins", "iou", "peak", "alike")]
        print(f"| {name} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.2f} | {'—' if np.isnan(cells[3]) else f'{cells[3]:.3f}'} |")
    print(f"| the records' text share | — | {np.mean([row[-1]['iou'] for row in table]):.2f} | — | — |")
    print(f"\nThe words of one prompt with another pooled vector ({args.pairs} prompts): what is drawn, where they differ")
    print("| attribute, conditioning | as the words say | as the pooled vector's prompt says | neither |\n|---|---|---|---|")
    for key, shares in which_channel(model, args.pairs).items():
        print(f"| {key} | {shares['words']:.2f} | {shares['pooled']:.2f} | {shares['neither']:.2f} |")
    print(f"\nAnother shape noun's states at some rows only ({args.pairs} prompts): the shape drawn")
    print("| rows swapped | the prompt's shape | the other noun's | neither |\n|---|---|---|---|")
    for rows, shares in where_the_noun_is_read(model, args.pairs).items():
        print(f"| {rows} | " + " | ".join(f"{share:.2f}" for share in shares.values()) + " |")


if __name__ == "__main__":
    main()

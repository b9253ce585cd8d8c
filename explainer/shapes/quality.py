"""Quality report for the shapes model on held-out colour-shape-place prompts: the colour, place
and shape gates on --n prompts, and the attention gate on the first --attention-n of them.

    python -m explainer.shapes.quality --model assets/shapes-ldm --n 200
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from explainer.shapes.checker import Detection, detect, generated_shape_mask
from explainer.shapes.world import evaluation_prompts

GATES = {"colour": 0.90, "place": 0.85, "shape": 0.75}
ATTENTION_GATE = 0.4  # mean IoU of the noun's map (last third of the steps, thresholded at its mean)
DEFAULT_GUIDANCE = 5.0
DEFAULT_STEPS = 20
FIRST_SEED = 1000


@dataclass
class EvaluationSample:
    prompt: str
    seed: int
    expected: dict  # {"colour", "shape", "place"}
    image: np.ndarray = field(repr=False)  # uint8 (64, 64, 3)
    detection: Detection | None
    mask: np.ndarray = field(repr=False)  # bool: the generated shape's region

    def correct(self, key: str) -> bool:
        return self.detection is not None and getattr(self.detection, key) == self.expected[key]


def load_pipeline(model: str | Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], guidance: float = DEFAULT_GUIDANCE,
             steps: int = DEFAULT_STEPS) -> list[np.ndarray]:
    """Images (uint8 H x W x 3) for prompts, one fixed seed each."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="np")
    return [np.round(np.clip(im, 0, 1) * 255).astype(np.uint8) for im in out.images]


def evaluation_samples(pipe, n: int = 200, guidance: float = DEFAULT_GUIDANCE,
                       steps: int = DEFAULT_STEPS, batch: int = 25) -> Iterator[EvaluationSample]:
    """Generate the n held-out evaluation prompts and check each image.

    Every sample carries the generated image and `mask`, the checker's
    segmentation of the main shape in that image (see
    `checker.generated_shape_mask`), so attention maps can be scored against it.
    """
    items = evaluation_prompts(n)
    for start in range(0, n, batch):
        chunk = items[start:start + batch]
        seeds = [FIRST_SEED + start + i for i in range(len(chunk))]
        images = generate(pipe, [c[0] for c in chunk], seeds, guidance, steps)
        for (prompt, colour, shape, place), seed, image in zip(chunk, seeds, images):
            yield EvaluationSample(
                prompt=prompt, seed=seed,
                expected={"colour": colour, "shape": shape, "place": place},
                image=image, detection=detect(image), mask=generated_shape_mask(image),
            )


def quality_report(samples: list[EvaluationSample]) -> dict:
    """Accuracy per attribute and whether each gate passes."""
    n = len(samples)
    scores = {key: sum(s.correct(key) for s in samples) / n for key in GATES}
    return {
        "n": n,
        "accuracy": scores,
        "gates": GATES,
        "passed": {key: scores[key] >= GATES[key] for key in GATES},
        "no_shape_found": sum(s.detection is None for s in samples),
    }


def save_grid(samples: list[EvaluationSample], path: Path, columns: int = 10) -> None:
    from PIL import Image

    images = [s.image for s in samples[: columns * (len(samples) // columns or 1)]]
    rows = [np.concatenate(images[i:i + columns], axis=1) for i in range(0, len(images), columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def attention_gate(pipe, n: int) -> dict:
    """The attention gate (``explainer.shapes.truth.noun_attention_iou``) on the first n held-out prompts."""
    from explainer import config
    from explainer.shapes.truth import noun_attention_iou
    from explainer.models import LoadedModel

    model = LoadedModel.from_pipeline(pipe, "shapes-under-test", config.MODELS[config.EMBEDDED_MODEL_ID])
    scores = noun_attention_iou(model, [prompt for prompt, *_ in evaluation_prompts(n)], first_seed=FIRST_SEED)
    return {"mean": float(np.mean(scores)), "per_prompt": [round(score, 3) for score in scores]}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Shapes model quality report")
    parser.add_argument("--model", default="assets/shapes-ldm")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention-n", type=int, default=40, help="prompts for the attention gate (0: skip)")
    parser.add_argument("--out", default=None, help="JSON path (default runs/quality-*.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.time()
    pipe = load_pipeline(args.model)
    samples = list(evaluation_samples(pipe, args.n, args.guidance, args.steps))
    report = quality_report(samples)
    if args.attention_n:
        report["attention_iou"] = attention_gate(pipe, args.attention_n)
    report.update(model=str(args.model), guidance=args.guidance, steps=args.steps,
                  scheduler=type(pipe.scheduler).__name__, seconds=round(time.time() - started, 1))
    report["samples"] = [
        {"prompt": s.prompt, "seed": s.seed, "expected": s.expected,
         "detected": None if s.detection is None else
         {k: getattr(s.detection, k) for k in ("colour", "shape", "place")}}
        for s in samples
    ]
    out = Path(args.out or f"runs/quality-g{args.guidance:g}-n{args.n}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    save_grid(samples[:40], out.with_suffix(".png"))
    acc = report["accuracy"]
    print(f"colour {acc['colour']:.1%}  place {acc['place']:.1%}  shape {acc['shape']:.1%}  "
          f"(n={args.n}, guidance {args.guidance}, {args.steps} steps, "
          f"{report['seconds']}s) -> {out}")
    if args.attention_n:
        print(f"attention IoU {report['attention_iou']['mean']:.2f} (gate {ATTENTION_GATE}, n={args.attention_n})")
    return report


if __name__ == "__main__":
    main()

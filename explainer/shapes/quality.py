"""Quality report for a shapes model on held-out colour-shape-place prompts: the colour, place
and shape gates on --n prompts, and the attention gate on the first --attention-n of them.

    python -m explainer.shapes.quality --model assets/shapes-ldm --n 200
    python -m explainer.shapes.quality --model assets/shapes-mmdit --n 200

``--model`` is a folder holding a saved pipeline (its family read from ``model_index.json``) or a
model id of the config; images come from the family's own diffusers pipeline call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from explainer import config
from explainer.families import family as family_named
from explainer.families import family_of_pipeline_class
from explainer.models import LoadedModel
from explainer.shapes.checker import Detection, detect, generated_shape_mask
from explainer.shapes.world import evaluation_prompts

GATES = {"colour": 0.90, "place": 0.85, "shape": 0.75}
ATTENTION_GATE = 0.4  # mean IoU of the noun's map (last third of the steps, thresholded at its mean)
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


# The embedded model of each family: a folder of that family is checked with its spec's settings.
_EMBEDDED_OF_FAMILY = {config.MODELS[model_id].family: model_id for model_id in config.EMBEDDED_MODEL_IDS}


def model_spec_for(model: str | Path) -> config.ModelSpec:
    """The spec of a config id, or of a pipeline folder: the embedded spec of its family with that source."""
    if str(model) in config.MODELS:
        return config.MODELS[str(model)]
    index = Path(model) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{model} is neither a model id of the config nor a folder with a model_index.json.")
    family = family_of_pipeline_class(json.loads(index.read_text())["_class_name"])
    if family not in _EMBEDDED_OF_FAMILY:
        raise ValueError(f"No shapes model of the {family} family is known; known: {', '.join(_EMBEDDED_OF_FAMILY)}.")
    return dataclasses.replace(config.MODELS[_EMBEDDED_OF_FAMILY[family]], source=str(model))


def load_model(model: str | Path) -> LoadedModel:
    """The model on the CPU in float32, as the app loads it."""
    spec = model_spec_for(model)
    pipe = family_named(spec.family).load(spec.source, torch.device("cpu"), torch.float32, local_files_only=True)
    return LoadedModel.from_pipeline(pipe, spec.id, spec)


def generate(model: LoadedModel, prompts: list[str], seeds: list[int], guidance: float | None = None,
             steps: int = DEFAULT_STEPS) -> list[np.ndarray]:
    """Images (uint8 H x W x 3) for prompts, one fixed seed each, from the pipeline's own call
    (guidance None: the model's own)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    length = model.spec.max_sequence_length
    extra = {} if length is None else {"max_sequence_length": length}
    with torch.no_grad():
        out = model.pipe(prompts, num_inference_steps=steps,
                         guidance_scale=model.spec.guidance if guidance is None else guidance, generator=generators,
                         height=model.spec.height, width=model.spec.width, output_type="np", **extra)
    return [np.round(np.clip(im, 0, 1) * 255).astype(np.uint8) for im in out.images]


def evaluation_samples(model: LoadedModel, n: int = 200, guidance: float | None = None,
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
        images = generate(model, [c[0] for c in chunk], seeds, guidance, steps)
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


def attention_gate(model: LoadedModel, n: int) -> dict:
    """The attention gate (``explainer.shapes.truth.noun_attention_iou``) on the first n held-out prompts."""
    from explainer.shapes.truth import noun_attention_iou

    scores = noun_attention_iou(model, [prompt for prompt, *_ in evaluation_prompts(n)], first_seed=FIRST_SEED)
    return {"mean": float(np.mean(scores)), "per_prompt": [round(score, 3) for score in scores]}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Shapes model quality report")
    parser.add_argument("--model", default="assets/shapes-ldm")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own (config)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention-n", type=int, default=40, help="prompts for the attention gate (0: skip)")
    parser.add_argument("--out", default=None, help="JSON path (default runs/quality-*.json)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.time()
    model = load_model(args.model)
    args.guidance = model.spec.guidance if args.guidance is None else args.guidance
    samples = list(evaluation_samples(model, args.n, args.guidance, args.steps))
    report = quality_report(samples)
    if args.attention_n:
        report["attention_iou"] = attention_gate(model, args.attention_n)
    report.update(model=str(args.model), guidance=args.guidance, steps=args.steps,
                  scheduler=type(model.pipe.scheduler).__name__, seconds=round(time.time() - started, 1))
    report["samples"] = [
        {"prompt": s.prompt, "seed": s.seed, "expected": s.expected,
         "detected": None if s.detection is None else
         {k: getattr(s.detection, k) for k in ("colour", "shape", "place")}}
        for s in samples
    ]
    out = Path(args.out or f"runs/quality-{Path(args.model).name}-g{args.guidance:g}-n{args.n}.json")
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

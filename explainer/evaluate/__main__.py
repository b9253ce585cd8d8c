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
from pathlib import Path

from explainer import config, metrics
from explainer.evaluate.protocol import MAP_METHODS, Protocol, default_prompts, evaluate_prompt
from explainer.methods import VARIANTS
from explainer.evaluate.tables import format_table, summarise, write_results
from explainer.models import load_model


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
    parser.add_argument("--methods", nargs="+", choices=list(dict.fromkeys([*MAP_METHODS, *VARIANTS])), default=list(MAP_METHODS),
                        help="method variants (explainer.methods.VARIANTS) and cross-attention; default: the table's")
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


if __name__ == "__main__":
    main()

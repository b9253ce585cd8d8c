"""Evaluate the explanation methods: insertion/deletion AUC, correlation and localisation (docs/methods.md).

One command, from the embedded models on a CPU to the paper's protocol on a GPU:

    python -m explainer.evaluate                                   # both embedded models (UNet, MM-DiT) side by side
    python -m explainer.evaluate --model embedded/shapes-mmdit     # one of them
    python -m explainer.evaluate --model CompVis/stable-diffusion-v1-4 --prompts coco.txt --num-prompts 1000
    accelerate launch --num_processes 8 -m explainer.evaluate ...  # GPUs: prompts split, one table gathered
    torchrun --nproc_per_node 2 -m explainer.evaluate ...          # the same split on CPU processes

Per model and prompt it makes a run, explains one step with every method, scores each map by
insertion and deletion, correlates the maps, and, on the shapes world, scores them against the
drawn shape at every step. Writes ``results.json``, ``results.csv`` and ``curves.png`` per model to
``--out``/<model>, and ``comparison.md`` (the models side by side) and ``timesteps.png`` (mIoU at
every step) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from explainer import config, metrics
import torch

from explainer.evaluate.protocol import DEFAULT_METHODS, MAP_METHODS, PHASES_ONLY, Protocol, default_prompts, evaluate_prompt
from explainer.evaluate.tables import format_table, summarise, write_comparison, write_results
from explainer.methods import VARIANTS
from explainer.models import load_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m explainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=config.embedded_models_present() or [config.default_model_id()],
                        choices=list(config.MODELS), help="one or more models (default: the embedded ones, both families)")
    parser.add_argument("--prompts", type=Path, help="a text file, one prompt per line (default: held-out shapes prompts or the paper's)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts per model (8 keeps both embedded models within 45 minutes on 2 cores: docs/evaluation.md)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step", type=int, default=15, help="the explained step (1-based)")
    parser.add_argument("--guidance", type=float, help="default: each model's own")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--masks", type=int, default=500, help="DF-RISE masks")
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--distances", nargs="+", choices=metrics.DISTANCES, default=["1-ssim", "mse"],
                        help="the first is the main table's; the others are scored from the same states at no cost")
    parser.add_argument("--fills", nargs="+", choices=metrics.FILLS, default=list(Protocol.fills),
                        help="what stands in for removed pixels: the first is the main table's; the others are reported "
                             f"beside it (default: {' '.join(Protocol.fills)})")
    parser.add_argument("--methods", nargs="+", choices=list(dict.fromkeys([*MAP_METHODS, *VARIANTS])), default=list(DEFAULT_METHODS),
                        help="method variants (explainer.methods.VARIANTS) and the attention maps; default: one of each method")
    parser.add_argument("--every-step", nargs="*", choices=list(PHASES_ONLY), default=[],
                        help="also localise these slow methods at every step (default: at the three phases)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the prompts a stopped run of the same settings finished (its rows.partial files)")
    args = parser.parse_args(argv)
    from accelerate import PartialState
    from tqdm import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    models = list(dict.fromkeys(args.model))
    summaries = {}
    share = -(-args.num_prompts // state.num_processes)  # this process's prompts per model, at most
    with tqdm(total=share * len(models), desc=f"process {state.process_index}", disable=not state.is_local_main_process) as progress:
        for model_id in models:
            summaries[model_id] = evaluate_model(args, model_id, state, progress)
    if state.is_main_process and len(models) > 1:
        print(write_comparison(summaries, args.out))
    state.wait_for_everyone()
    if torch.distributed.is_initialized():  # leave the process group cleanly (gloo aborts otherwise)
        torch.distributed.destroy_process_group()
    return summaries


def evaluate_model(args, model_id: str, state, progress) -> dict:
    """One model's rows (this process's share of the prompts), gathered; the summary written to
    ``args.out``/<model> by the main process."""
    from accelerate.utils import gather_object

    model = load_model(model_id)
    protocol = Protocol(model=model_id, steps=args.steps, step=args.step, guidance=args.guidance or model.spec.guidance,
                        seed=args.seed, masks=args.masks, lime_samples=args.lime_samples, batch_size=args.batch_size,
                        distances=tuple(dict.fromkeys(args.distances)), methods=tuple(args.methods),
                        every_step=tuple(args.every_step), fills=tuple(dict.fromkeys(args.fills)))
    prompts = args.prompts.read_text().splitlines() if args.prompts else default_prompts(model_id, args.num_prompts)
    prompts = [p.strip() for p in prompts if p.strip()][: args.num_prompts]
    folder = args.out / model_id.rsplit("/", 1)[-1]
    partial = folder / f"rows.partial.{state.process_index}.jsonl"  # each finished prompt, as it finishes
    with state.split_between_processes(list(enumerate(prompts))) as mine:
        progress.set_postfix_str(model_id)
        done = finished_rows(partial, protocol, mine) if args.resume else {}
        partial.parent.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            partial.unlink(missing_ok=True)
        rows = []
        for index, prompt in mine:
            row = done.get(index) or evaluate_prompt(protocol, model, index, prompt)
            if index not in done:
                with open(partial, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"protocol": protocol_key(protocol), "row": row}) + "\n")
            rows.append(row)
            progress.update()
    rows = sorted(gather_object(rows), key=lambda row: row["index"])
    summary = summarise(rows, protocol)
    state.wait_for_everyone()
    partial.unlink(missing_ok=True)
    if state.is_main_process:
        write_results(rows, summary, folder)
        print(f"\n{model_id}\n{format_table(summary)}")
    return summary


def protocol_key(protocol: Protocol) -> str:
    """What a stopped run's rows must share with this one to be kept."""
    return json.dumps(vars(protocol), sort_keys=True, default=list)


def finished_rows(partial: Path, protocol: Protocol, planned) -> dict[int, dict]:
    """The rows of ``planned`` (index, prompt) pairs that a stopped run with this protocol wrote to ``partial``."""
    if not partial.is_file():
        return {}
    wanted, key, rows = dict(planned), protocol_key(protocol), {}
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the run was stopped
            continue
        row = entry["row"]
        if entry["protocol"] == key and wanted.get(row["index"]) == row["prompt"]:
            rows[row["index"]] = row
    return rows


if __name__ == "__main__":
    main()

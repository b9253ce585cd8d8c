"""Memory: bytes of the stored records of a run, per step and for a whole run; peak GPU memory vs plain.

Records are what a session keeps (latents, x0_hat, previews, VAE views, attention maps, per-group
maps). Targets: SD v1.5 size, 512x512, 30 steps: <= 64 MB; FLUX.1 at 1024x1024, 28 steps, a
77-token prompt: <= 128 MB; peak GPU memory <= 1.1x the plain pipe. The maps keep one row per
prompt token, so the size is measured for several prompt lengths. A tensor two records share (a
step's x_t is the step before's x_{t-1}) counts once.
Run: python benchmarks/memory.py [--model sd15|flux] [--steps 5] [--tokens 10,20,40,77]   (per step: it extrapolates)
  --model flux runs the FLUX-shaped model in bfloat16 (what a GPU stores) at 1024x1024, VAE views
  decoded every ``vae_decode_every`` steps as on a GPU.
"""

import io

import numpy as np
import torch
from PIL import Image

from common import benchmark_model, header, parser, save
from explainer.run import InstrumentedRun, RunSettings


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Image.Image):
        return len(value.tobytes())
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


def prompt_of(tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens with the start and end tokens ("a" is one token in
    every tokenizer used here): the stored maps keep one row per token, so size follows length."""
    return " ".join(["a"] * (tokens - 2))


VIEWS = ("noisy_view", "prediction_view")


def per_step_bytes(model, settings: RunSettings) -> tuple[dict[str, float], int]:
    """Mean bytes per step of each field (the VAE views: per step that decoded them)."""
    run = InstrumentedRun(model, settings).run_all().data
    per_field: dict[str, int] = {}
    counted: set[int] = set()
    for record in run.records:
        for name, value in vars(record).items():
            if isinstance(value, torch.Tensor) and id(value) in counted:
                continue  # shared with another record (x_t = the step before's x_{t-1})
            counted.add(id(value))
            per_field[name] = per_field.get(name, 0) + nbytes(value)
    decoded = sum(record.prediction_view is not None for record in run.records)
    return ({name: size / (decoded if name in VIEWS else len(run.records)) for name, size in per_field.items() if size},
            run.records[0].attention.shape[0])


def run_bytes(per_field: dict[str, float], steps: int, decode_every: int) -> float:
    """A whole run's bytes: every field at every step, the views at the steps the run decodes."""
    decodes = len({*range(decode_every, steps + 1, decode_every), steps}) if decode_every else 1
    return sum(size * (decodes if name in VIEWS else steps) for name, size in per_field.items())


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--steps", type=int, default=5, help="steps actually run (VAE views come every 5th step at SD size)")
    cli.add_argument("--tokens", default="10,20,40,77", help="prompt lengths in tokens, start and end included")
    args = cli.parse_args()
    model, shape = benchmark_model(args.model)
    run_steps, target = (28, 128) if args.model == "flux" else (30, 64)
    if args.model == "flux":  # what a GPU stores: the model's own half precision
        model.pipe.to(torch.bfloat16)
    shape = shape | {"steps": args.steps}
    lengths = [int(n) for n in args.tokens.split(",")]
    settings = [RunSettings(prompt=prompt_of(n), seed=1, per_group=True, vae_decode_every=model.spec.vae_decode_every, **shape) for n in lengths]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model.pipe(settings[0].prompt, num_inference_steps=args.steps, width=shape["width"], height=shape["height"], output_type="pil")
        plain_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    lines = [header("Memory of stored records", model), f"settings: {shape}; per_group=True (as the app runs)"]
    for length, one in zip(lengths, settings):
        per_field, rows = per_step_bytes(model, one)
        if length == lengths[0]:
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
            lines.append(f"a prompt of {length} tokens, per step (the views: per step that decodes them):")
            lines += [f"  {name:20s} {size / 2**20:8.3f} MB" for name, size in sorted(per_field.items(), key=lambda kv: -kv[1])]
        total = run_bytes(per_field, run_steps, model.spec.vae_decode_every)
        lines.append(f"{length:3d} tokens ({rows} map rows): {run_steps} steps, views every {model.spec.vae_decode_every}: "
                     f"{total / 2**20:.1f} MB (target <= {target} MB)")
    if peak is not None:
        lines.append(f"peak GPU memory ({lengths[0]} tokens): plain {plain_peak / 2**20:.0f} MB, instrumented {peak / 2**20:.0f} MB: "
                     f"{peak / plain_peak:.3f}x (target <= 1.1x)")
    save(f"memory-{args.model}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

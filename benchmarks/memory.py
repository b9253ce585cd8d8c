"""Memory: bytes of the stored records of a run, per step and for 30 steps; peak GPU memory vs plain.

Records are what a session keeps (latents, x0_hat, previews, VAE views, attention maps, per-group
maps). Target at SD v1.5 size, 512x512, 30 steps: <= 64 MB; peak GPU memory <= 1.1x the plain pipe.
The maps keep one row per prompt token, so the size is measured for several prompt lengths.
Run: python benchmarks/memory.py [--model sd15] [--steps 5] [--tokens 10,20,40,77]   (per step: it extrapolates to 30)
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


def per_step_bytes(model, settings: RunSettings) -> tuple[dict[str, float], int]:
    run = InstrumentedRun(model, settings).run_all().data
    per_field: dict[str, int] = {}
    for record in run.records:
        for name, value in vars(record).items():
            per_field[name] = per_field.get(name, 0) + nbytes(value)
    return {name: size / len(run.records) for name, size in per_field.items() if size}, run.records[0].attention.shape[0]


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--steps", type=int, default=5, help="steps actually run (VAE views come every 5th step at SD size)")
    cli.add_argument("--tokens", default="10,20,40,77", help="prompt lengths in tokens, start and end included")
    args = cli.parse_args()
    model, shape = benchmark_model(args.model)
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
            lines.append(f"a prompt of {length} tokens, per step:")
            lines += [f"  {name:20s} {size / 2**20:8.3f} MB" for name, size in sorted(per_field.items(), key=lambda kv: -kv[1])]
        per_step = sum(per_field.values())
        lines.append(f"{length:3d} tokens ({rows} map rows): {per_step / 2**20:.3f} MB per step -> 30 steps: "
                     f"{30 * per_step / 2**20:.1f} MB (target <= 64 MB)")
    if peak is not None:
        lines.append(f"peak GPU memory ({lengths[0]} tokens): plain {plain_peak / 2**20:.0f} MB, instrumented {peak / 2**20:.0f} MB: "
                     f"{peak / plain_peak:.3f}x (target <= 1.1x)")
    save(f"memory-{args.model}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

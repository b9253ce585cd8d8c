"""Memory: bytes of the stored records of a run, per step and for 30 steps; peak GPU memory vs plain.

Records are what a session keeps (latents, x0_hat, previews, VAE views, attention maps, per-layer
maps). Target at SD v1.5 size, 512x512, 30 steps: <= 64 MB; peak GPU memory <= 1.1x the plain pipe.
Run: python benchmarks/memory.py [--model sd15] [--steps 2]   (per-step size is constant: it extrapolates)
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


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--steps", type=int, default=2, help="steps actually run (sizes are per step)")
    args = cli.parse_args()
    model, shape = benchmark_model(args.model)
    shape = shape | {"steps": args.steps}
    settings = RunSettings(prompt="a photo of an astronaut riding a horse", seed=1, per_layer=True, vae_decode_every=model.spec.vae_decode_every, **shape)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model.pipe(settings.prompt, num_inference_steps=args.steps, width=shape["width"], height=shape["height"], output_type="pil")
        plain_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    run = InstrumentedRun(model, settings).run_all()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    per_field: dict[str, int] = {}
    for record in run.records:
        for name, value in vars(record).items():
            per_field[name] = per_field.get(name, 0) + nbytes(value)
    per_step = sum(per_field.values()) / len(run.records)
    lines = [header("Memory of stored records", model), f"settings: {shape}"]
    lines += [f"  {name:20s} {size / len(run.records) / 2**20:8.3f} MB per step" for name, size in sorted(per_field.items(), key=lambda kv: -kv[1]) if size]
    lines.append(f"per step: {per_step / 2**20:.3f} MB -> 30 steps: {30 * per_step / 2**20:.1f} MB (target <= 64 MB)")
    if peak is not None:
        lines.append(f"peak GPU memory: plain {plain_peak / 2**20:.0f} MB, instrumented {peak / 2**20:.0f} MB: {peak / plain_peak:.3f}x (target <= 1.1x)")
    save(f"memory-{args.model}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Capture overhead: the instrumented run (previews + per-token cross-attention maps) vs the plain pipeline.

Same model, prompt, seed, steps and size; the two alternate so load drifts hit both alike.
Target: <= 1.10x on a GPU, <= 1.25x on the CPU.   Run: python benchmarks/capture_overhead.py
"""

import torch

from common import benchmark_model, header, parser, save, side_by_side
from explainer.run import InstrumentedRun, RunSettings

PROMPT = "a red circle on the left"


def main() -> None:
    args = parser(__doc__).parse_args()
    model, shape = benchmark_model(args.model)
    pipe = model.pipe
    settings = RunSettings(prompt=PROMPT, seed=1, vae_decode_every=0, **shape)
    scheduler = InstrumentedRun(model, settings).scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config)

    def plain():
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=shape["steps"], guidance_scale=shape["guidance"], width=shape["width"],
                 height=shape["height"], generator=torch.Generator().manual_seed(1), output_type="pil")

    def instrumented():
        InstrumentedRun(model, settings).run_all()

    def instrumented_per_group():
        InstrumentedRun(model, RunSettings(prompt=PROMPT, seed=1, vae_decode_every=0, per_group=True, **shape)).run_all()

    times = side_by_side({"plain pipeline": plain, "instrumented": instrumented, "instrumented, per-group maps": instrumented_per_group}, args.repeats)
    lines = [header("Capture overhead", model), f"settings: {shape}, {args.repeats} alternating repeats, median seconds per run"]
    for name, seconds in times.items():
        lines.append(f"{name:32s} {seconds:8.3f} s   {seconds / times['plain pipeline']:.3f}x")
    save("capture_overhead", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Capture overhead: the instrumented run (previews + per-token cross-attention maps) vs the plain pipeline,
and the run as the app makes it (per-group maps, VAE views only where the page shows them).

Same model, prompt, seed, steps and size; they alternate so load drifts hit all alike.
Targets: capture <= 1.10x on a GPU, <= 1.25x on the CPU (also on an MM-DiT: --model mmdit); the app's
run <= 1.4x on the CPU; a scrubbed step the run did not decode shown within 0.2 s.
Run: python benchmarks/capture_overhead.py [--model mmdit]
"""

import statistics

import torch

from common import benchmark_model, header, parser, save, side_by_side, timed
from explainer import config
from explainer.run import InstrumentedRun, RunSettings, decode_views

PROMPT = "a red circle on the left"


def shown_steps(steps: int) -> list[int]:
    """The steps a CPU run streams with pictures: at most one update in five carries them (the app's
    overlay period; its time budget usually allows fewer), and the last step."""
    period = max(1, steps // 5)
    return sorted({*range(period, steps + 1, period), steps})


def main() -> None:
    args = parser(__doc__).parse_args()
    model, shape = benchmark_model(args.model)
    pipe = model.pipe
    on_gpu = torch.cuda.is_available()
    settings = RunSettings(prompt=PROMPT, seed=1, vae_decode_every=0, **shape)
    scheduler = InstrumentedRun(model, settings).scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config)
    app_settings = RunSettings(prompt=PROMPT, seed=1, per_group=True, **shape,
                               vae_decode_every=config.run_decode_every(model.spec, on_gpu))
    last_run = {}

    length = {"max_sequence_length": model.spec.max_sequence_length} if model.spec.max_sequence_length else {}

    def plain():
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=shape["steps"], guidance_scale=shape["guidance"], width=shape["width"],
                 height=shape["height"], generator=torch.Generator().manual_seed(1), output_type="pil", **length)

    def instrumented():
        InstrumentedRun(model, settings).run_all()

    def instrumented_per_group():
        InstrumentedRun(model, RunSettings(prompt=PROMPT, seed=1, vae_decode_every=0, per_group=True, **shape)).run_all()

    def as_the_app_runs_it():  # on a CPU the page's pictures are decoded when shown; on a GPU by the run itself
        run = InstrumentedRun(model, app_settings).run_all().data
        if not on_gpu:
            decode_views(model, [run.records[step - 1] for step in shown_steps(shape["steps"])])
        last_run["records"] = run.records

    def every_step_decoded():  # the app before 2026-11-30: both views decoded at every step
        InstrumentedRun(model, RunSettings(prompt=PROMPT, seed=1, per_group=True, vae_decode_every=1, **shape)).run_all()

    times = side_by_side({"plain pipeline": plain, "instrumented": instrumented, "instrumented, per-group maps": instrumented_per_group,
                          "the app's run": as_the_app_runs_it, "the app's run, every step decoded": every_step_decoded},
                         args.repeats)
    undecoded = [record for record in last_run["records"] if record.prediction_view is None]
    scrub = [timed(lambda record=record: decode_views(model, [record]), 1)[0] for record in undecoded[:5]]
    lines = [header("Capture overhead", model), f"settings: {shape}, {args.repeats} alternating repeats, median seconds per run"]
    for name, seconds in times.items():
        lines.append(f"{name:36s} {seconds:8.3f} s   {seconds / times['plain pipeline']:.3f}x")
    if scrub:
        lines.append(f"scrubbing to a step the run did not decode (both views decoded then): median {statistics.median(scrub):.3f} s, "
                     f"max {max(scrub):.3f} s over {len(scrub)} steps")
    save("capture_overhead" + ("" if args.model == "embedded" else f"-{args.model}"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

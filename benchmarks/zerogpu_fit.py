"""ZeroGPU fit: every GPU-decorated function of the app, at the app's default settings, timed
against the duration it asks ZeroGPU for (its own duration function, computed from the work).

The functions are called as the handlers call them (`ui.gpu.run_on_device`, `relevance_on_device`,
`explain_on_device`); outside a Space `@spaces.GPU` leaves them as they are. Target: each
finishes well inside its duration, here measured / declared <= 0.5. With --model sd15 (on a GPU)
the SD v1.5-shaped model with random weights stands in for the Hub model under the Hub model's
id, so the durations are the ones the Space would declare; on a CPU the embedded model runs, and
its durations, which are GPU estimates, say little about a CPU.
Run: python benchmarks/zerogpu_fit.py [--model sd15]
"""

import threading

import torch
from common import benchmark_model, header, parser, save, timed
from explainer import config, models
from explainer.run import InstrumentedRun, RunSettings
from ui.settings import APP, explained_step

PROMPT = "a red circle on the left"
SD_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
WELL_INSIDE = 0.5


def main() -> None:
    args = parser(__doc__).parse_args()
    model, shape = benchmark_model(args.model)
    model_id = SD_ID if args.model == "sd15" else model.id
    models._CACHE[model_id] = model  # the decorated functions load it by id
    from ui import gpu  # after the model is in place

    spec = config.model_spec(model_id)
    settings = RunSettings(prompt=PROMPT, seed=1, per_group=True, vae_decode_every=spec.vae_decode_every, **shape).validated()
    run = InstrumentedRun(model, settings).run_all().data
    step = explained_step(shape["steps"])
    cases = {"denoise (one prompt)": (lambda: list(gpu.run_on_device(model_id, [settings.to_dict()])),
                                      gpu.run_duration(model_id, [settings.to_dict()])),
             "denoise (two prompts)": (lambda: list(gpu.run_on_device(model_id, [settings.to_dict()] * 2)),
                                       gpu.run_duration(model_id, [settings.to_dict()] * 2)),
             "token relevance, every step": (lambda: gpu.relevance_on_device(model_id, run),
                                             gpu.relevance_duration(model_id, run))}
    saliency = {"df-rise": {"masks": APP.rise_masks}, "df-rise, paper's N": {"masks": 500},
                "df-cam": {}, "df-lime": {}}
    for label, extra in saliency.items():
        name = label.split(",")[0]
        options = {"n_masks": extra["masks"]} if name == "df-rise" else {}  # the rest at the methods' defaults
        cases[f"{label} + insertion/deletion"] = (
            lambda name=name, options=options: gpu.explain_on_device(model_id, run, name, options, step, True),
            gpu.explain_duration(model_id, run, name, options, step, True),
        )
    on_gpu = torch.cuda.is_available()
    lines = [header("ZeroGPU fit", model),
             f"settings: {shape}; explained step {step}; median of {args.repeats} after a warm-up; "
             f"target: measured / declared <= {WELL_INSIDE}",
             f"{'GPU-decorated call':44s} {'measured':>9s} {'declared':>9s} {'ratio':>6s}"]
    for label, (function, declared) in cases.items():
        function()  # warm-up
        seconds = sorted(timed(function, args.repeats))[args.repeats // 2]
        verdict = ("fits" if seconds / declared <= WELL_INSIDE else "TOO CLOSE") if on_gpu else "(judged on a GPU only)"
        lines.append(f"{label:44s} {seconds:8.2f}s {declared:8d}s {seconds / declared:6.2f}  {verdict}")
    save(f"zerogpu_fit-{args.model}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    measuring = threading.Thread(target=main)  # the main thread stays free of PyTorch work (see streaming.py)
    measuring.start()
    measuring.join()

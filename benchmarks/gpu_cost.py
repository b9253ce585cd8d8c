"""GPU work of each Hub model at its defaults, counted, and the ZeroGPU duration each of the app's
GPU calls asks for (``ui.gpu``'s duration functions, from ``explainer.cost``'s counts).

No GPU and no weights: the models are built on the meta device from their architectures. What it
prints is what the durations assume (a throughput anchored to a published A100 timing, docs/design.md,
"ZeroGPU durations"); ``zerogpu_fit.py`` on a GPU measures how the real calls fit them.
Run: python benchmarks/gpu_cost.py
"""

from types import SimpleNamespace

from common import save
from explainer import config
from explainer.cost import step_cost
from explainer.methods import DFLime
from ui import gpu
from ui.settings import APP, explained_step, sustained_tflops

CALLS = ("run", "relevance", "df-rise + score", "df-cam + score", "df-lime + score", "spot")


def durations(spec: config.ModelSpec) -> dict[str, str]:
    settings = {"steps": spec.steps, "width": spec.width, "height": spec.height, "guidance": spec.guidance,
                "vae_decode_every": spec.vae_decode_every}
    scale = step_cost(spec.id).scale
    run = SimpleNamespace(records=[None] * spec.steps, latent_size=(spec.height // scale, spec.width // scale),
                          settings=SimpleNamespace(**settings))
    step = explained_step(spec.steps)
    cases = {
        "run": lambda: gpu.run_duration(spec.id, [settings]),
        "relevance": lambda: gpu.relevance_duration(spec.id, run),
        "df-rise + score": lambda: gpu.explain_duration(spec.id, run, "df-rise", {"n_masks": APP.rise_masks}, step, True),
        "df-cam + score": lambda: gpu.explain_duration(spec.id, run, "df-cam", {}, step, True),
        "df-lime + score": lambda: gpu.explain_duration(spec.id, run, "df-lime", {"n_samples": DFLime.n_samples}, step, True),
        "spot": lambda: gpu.spot_duration(spec.id, run, step, 0, 0),
    }
    shown = {}
    for name, duration in cases.items():
        try:
            shown[name] = f"{duration()} s"
        except ValueError:  # more than one ZeroGPU call may take
            shown[name] = "refused"
    return shown


def main() -> None:
    model_id, steps, side, seconds = APP.gpu_reference
    lines = ["# GPU work and ZeroGPU durations, counted on the meta device",
             f"throughput assumed: {sustained_tflops():.1f} TFLOP/s counted ({model_id}, {steps} guided steps at {side}x{side} "
             f"and the decode in {seconds} s on an A100); per call {APP.gpu_call_seconds} s; fixed part "
             f"{APP.gpu_overhead_seconds:.0f} s; margin x{APP.gpu_margin:g}; at most {APP.max_gpu_seconds} s a call",
             f"{'model':44s} {'size':>9s} {'steps':>5s} {'TFLOP/eval':>10s} {'TFLOP/decode':>12s} "
             + " ".join(f"{name:>15s}" for name in CALLS)]
    for spec in config.MODELS.values():
        if not spec.hub:
            continue
        cost, shown = step_cost(spec.id), durations(spec)
        lines.append(f"{spec.id:44s} {spec.width:>4d}x{spec.height:<4d} {spec.steps:>5d} {cost.denoiser(spec.width, spec.height):>10.2f} "
                     f"{cost.decode(spec.width, spec.height):>12.2f} " + " ".join(f"{shown[name]:>15s}" for name in CALLS))
    save("gpu_cost", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

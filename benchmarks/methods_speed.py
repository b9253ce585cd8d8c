"""Speed of the paper's methods, each against the slower way, side by side in one run.

- DF-RISE, N masks: batched (many masks per denoiser call) vs one mask per call, as the public code does.
  Target on a GPU: >= 8x faster, and <= 15 s at SD v1.5 size with N = 500.
- DF-CAM: every layer hooked in one forward and backward pass vs one pass per layer; and the count
  of denoiser calls of the public code, which regenerates the image once per layer.
Run: python benchmarks/methods_speed.py [--masks 500] [--model sd15]
"""

import time

from common import benchmark_model, header, parser, save, synchronize
from explainer.methods import DFCam, DFRise, cam_layers
from explainer.run import InstrumentedRun, RunSettings


def seconds(function) -> tuple[float, object]:
    synchronize()
    start = time.perf_counter()
    result = function()
    synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--masks", type=int, default=500)
    cli.add_argument("--batch-size", type=int, default=64)
    args = cli.parse_args()
    model, shape = benchmark_model(args.model)
    shape = shape | {"steps": 20}
    run = InstrumentedRun(model, RunSettings(prompt="a red circle on the left", seed=1, **shape)).run_all().data
    step = 15
    lines = [header("Method speed", model), f"run: {shape}; explained step {step}"]

    batched = DFRise(n_masks=args.masks, batch_size=args.batch_size)
    one_by_one = DFRise(n_masks=args.masks, batch_size=1)
    batched.explain(model, run, step)  # warm-up
    fast, fast_result = seconds(lambda: batched.explain(model, run, step))
    slow, slow_result = seconds(lambda: one_by_one.explain(model, run, step))
    lines += [
        f"DF-RISE N={args.masks}: batched ({args.batch_size} masks per call, {fast_result.denoiser_calls} calls) {fast:.2f} s; "
        f"one mask per call ({slow_result.denoiser_calls} calls) {slow:.2f} s: {slow / fast:.1f}x faster",
        f"  same map either way: max |difference| = {abs(fast_result.saliency - slow_result.saliency).max():.2e}",
    ]

    layers = cam_layers(model)
    DFCam().explain(model, run, step)  # warm-up
    one_pass, cam = seconds(lambda: DFCam().explain(model, run, step))
    per_layer, _ = seconds(lambda: [DFCam(layers=(layer,)).explain(model, run, step) for layer in layers])
    public_calls = len(layers) * (step + 1)  # a whole generation up to the step, once per layer
    lines += [
        f"DF-CAM, {len(layers)} layers: one pass {one_pass:.3f} s ({cam.denoiser_calls} forward+backward); "
        f"one pass per layer {per_layer:.3f} s ({len(layers)} calls): {per_layer / one_pass:.1f}x faster",
        f"  denoiser calls: ours 1, one per layer {len(layers)}, the public code (regenerate per layer up to step {step}) "
        f"{public_calls}: {public_calls}x fewer",
    ]
    save("methods_speed", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Streaming through the app: seconds to the first streamed step, and what streaming every step costs.

Launches the app in this process, then calls /denoise with gradio_client. The run alone (the
library, no UI) is timed side by side. Targets: first step <= 0.5 s; streaming adds <= 10 %.
Run: python benchmarks/streaming.py
"""

import socket
import statistics
import time

from common import benchmark_model, header, parser, save, side_by_side
from explainer.run import InstrumentedRun, RunSettings

PROMPT = "a red circle on the left"


def main() -> None:
    args = parser(__doc__).parse_args()
    model, shape = benchmark_model(args.model)
    import app
    from gradio_client import Client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    call = [model.id, PROMPT, "", "", 1, shape["steps"], shape["guidance"], shape["width"], shape["height"], "uniform", 60, ""]
    first_steps = []

    def streamed():
        start = time.perf_counter()
        job = client.submit(*call, api_name="/denoise")
        for index, _ in enumerate(job):
            if index == 0:
                first_steps.append(time.perf_counter() - start)

    def library_only():
        settings = RunSettings(prompt=PROMPT, seed=1, per_layer=True, vae_decode_every=model.spec.vae_decode_every, **shape)
        InstrumentedRun(model, settings).run_all()

    times = side_by_side({"run alone (library)": library_only, "streamed through the app": streamed}, args.repeats)
    app.demo.close()
    ratio = times["streamed through the app"] / times["run alone (library)"]
    lines = [
        header("Streaming", model),
        f"settings: {shape}; {args.repeats} alternating repeats; median seconds",
        f"first streamed step (click to first update, via gradio_client): {statistics.median(first_steps):.3f} s (max {max(first_steps):.3f} s)",
        *(f"{name:28s} {seconds:7.3f} s" for name, seconds in times.items()),
        f"streaming every step (rendering views, charts, overlays, transport): {ratio:.3f}x the run alone",
    ]
    save("streaming", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

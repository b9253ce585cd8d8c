"""Streaming through the app: seconds to the first streamed step, and what streaming costs a run.

Starts the app in a server process of its own (as on the Space: its users' clients are elsewhere),
then calls /denoise with gradio_client from this process, once downloading every streamed picture
(gradio_client's default) and once taking the data only (a browser fetches the pictures in a
process of its own). The run alone (the library, no UI) is timed side by side, in this process
while the server idles, and in a worker thread of this process: a server runs its work in one, and
on a CPU PyTorch's OpenMP runs small ops there up to 2x slower (PyTorch issue #37259). Targets: first step <= 0.5 s; streaming adds <= 10 %.
Run: python benchmarks/streaming.py
"""

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from common import benchmark_model, header, parser, save, side_by_side
from explainer import config
from explainer.run import InstrumentedRun, RunSettings

PROMPT = "a red circle on the left"
ROOT = Path(__file__).resolve().parent.parent


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = os.environ | {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the app did not start within 120 s")


def main() -> None:
    args = parser(__doc__).parse_args()
    model, shape = benchmark_model(args.model)
    from gradio_client import Client

    server, url = start_server()
    try:
        clients = {"pictures": Client(url, verbose=False), "data only": Client(url, verbose=False, download_files=False)}
        call = [model.id, PROMPT, "", "", 1, shape["steps"], shape["guidance"], shape["width"], shape["height"], "uniform", 60, ""]
        first_steps, drawn = [], []

        def streamed(client):
            start = time.perf_counter()
            updates = 0
            for updates, _ in enumerate(client.submit(*call, api_name="/denoise"), start=1):
                if updates == 1:
                    first_steps.append(time.perf_counter() - start)
            drawn.append(updates)

        def library_only():
            settings = RunSettings(prompt=PROMPT, seed=1, per_layer=True, vae_decode_every=model.spec.vae_decode_every, **shape)
            InstrumentedRun(model, settings).run_all()

        def library_in_a_thread():  # where every server runs its work (PyTorch issue #37259 on CPUs)
            worker = threading.Thread(target=library_only)
            worker.start()
            worker.join()

        times = side_by_side(
            {
                "run alone (library)": library_only,
                "run alone in a worker thread": library_in_a_thread,
                "streamed, client fetches pictures": lambda: streamed(clients["pictures"]),
                "streamed, client takes data only": lambda: streamed(clients["data only"]),
            },
            args.repeats,
        )
    finally:
        server.kill()
    alone, threaded = times["run alone (library)"], times["run alone in a worker thread"]
    lines = [
        header("Streaming", model),
        f"settings: {shape}; server in its own process; {args.repeats} alternating repeats; median seconds",
        f"first streamed step (click to first update, via gradio_client): {statistics.median(first_steps):.3f} s (max {max(first_steps):.3f} s)",
        *(f"{name:36s} {seconds:7.3f} s  ({seconds / alone:.3f}x the run alone, {seconds / threaded:.3f}x in a thread)" for name, seconds in times.items()),
        f"updates with pictures per run: median {statistics.median(drawn):.0f} of {shape['steps']} steps "
        f"(every step's numbers are sent; on the CPU pictures go out while that takes <= {config.LIMITS.cpu_stream_share:.0%} of the time)",
    ]
    save("streaming", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

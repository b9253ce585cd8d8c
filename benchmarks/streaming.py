"""Streaming through the app: seconds to the first streamed step, and what streaming costs a run.

Starts the app in a server process of its own (as on the Space: its users' clients are elsewhere),
then calls /denoise with gradio_client from this process, once downloading every streamed picture
(gradio_client's default) and once taking the data only (a browser fetches the pictures in a
process of its own). The run alone (the library, no UI) is timed side by side in this process,
twice: as the server runs it (in a new thread, with the server's share of the CPU cores) and with
all the cores in one long-lived thread, the fastest way the library runs on a CPU.

On a CPU the threads matter: PyTorch's OpenMP (libgomp) runs the embedded model's small ops 2-3x
slower in a thread while another live thread holds an OpenMP team of its own (PyTorch issue
#37259; libgomp cuts its spin-wait short once it manages more threads than cores). A server's
handlers run in many threads, so `python app.py` gives each concurrent run one thread on 2 cores
(`models.share_cpu_cores`), and this script leaves its main thread free of PyTorch work.
A one-step run, alone and streamed, measures what the app costs per request whatever the run
(queueing, the final update with every picture, the transfer), so that what streaming adds on top
is printed apart; a one-line Gradio app gives Gradio's own floor. On 2 shared cores the figures
vary by about 10 % from run to run: compare several runs.
Streaming's own cost is measured the most directly against the same app sending only the first
and the last step (a second server, side by side): same request, same final update, no stream.
Targets: first step <= 0.5 s; streaming adds <= 10 % to the run as served.
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
import torch
from common import benchmark_model, header, parser, save, side_by_side
from explainer import config
from explainer.models import share_cpu_cores
from explainer.run import InstrumentedRun, RunSettings
from ui.settings import APP

PROMPT = "a red circle on the left"
ROOT = Path(__file__).resolve().parent.parent


# Gradio's own floor: a streamed endpoint that yields its input once, in a server of its own.
TRIVIAL_APP = """
import gradio as gr
def echo(text):
    yield text
with gr.Blocks() as demo:
    box = gr.Textbox()
    gr.Button().click(echo, box, box, api_name="echo")
demo.launch()
"""


# The same app sending only its first and last step (its picture budget spent by the first update,
# no light updates): what the run costs through the app when it is not streamed.
UNSTREAMED_APP = """
import dataclasses
from ui import settings
settings.APP = dataclasses.replace(settings.APP, cpu_stream_share=0.0, max_update_gap_s=None)
import app
app.serve()
"""


def start_server(command: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """The app (or ``command``) in a process of its own on a free port; its URL once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = os.environ | {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command or [sys.executable, "app.py"], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def gradio_floor(repeats: int) -> float:
    """Median seconds of a streamed echo through gradio_client: what any Gradio request costs here."""
    from gradio_client import Client

    server, url = start_server([sys.executable, "-c", TRIVIAL_APP])
    try:
        client = Client(url, verbose=False, download_files=False)
        return side_by_side({"echo": lambda: list(client.submit("x", api_name="/echo"))}, 3 * repeats)["echo"]
    finally:
        server.kill()


def main() -> None:
    cli = parser(__doc__)
    cli.set_defaults(model="embedded")  # the target; the server process loads models by their config id
    args = cli.parse_args()
    if args.model != "embedded":
        cli.error("streaming is measured on the embedded model: the app's server loads only the config's models")
    model, shape = benchmark_model(args.model)
    from gradio_client import Client

    floor = gradio_floor(args.repeats)  # first, on its own: an idle second server would load the cores
    server, url = start_server()
    unstreamed_server, unstreamed_url = start_server([sys.executable, "-c", UNSTREAMED_APP])
    try:
        clients = {"pictures": Client(url, verbose=False), "data only": Client(url, verbose=False, download_files=False),
                   "unstreamed": Client(unstreamed_url, verbose=False, download_files=False)}
        first_steps, drawn = [], []

        def streamed(client, steps=shape["steps"], record=True):
            call = [model.id, PROMPT, "", "", 1, steps, shape["guidance"], shape["width"], shape["height"], "uniform", 60, ""]
            start = time.perf_counter()
            pictures = set()  # the prediction view's files: a light update leaves it as it was
            for updates, outputs in enumerate(client.submit(*call, api_name="/denoise"), start=1):
                if updates == 1 and record and steps == shape["steps"]:
                    first_steps.append(time.perf_counter() - start)
                pictures.add(str(outputs[0]))
            if record and steps == shape["steps"]:
                drawn.append(len(pictures))

        def library_only(steps=shape["steps"]):
            settings = RunSettings(prompt=PROMPT, seed=1, per_group=True, vae_decode_every=config.run_decode_every(model.spec, torch.cuda.is_available()),
                                   **(shape | {"steps": steps}))
            InstrumentedRun(model, settings).run_all()

        def library_as_the_server_runs_it(steps=shape["steps"]):  # a new thread, the server's share of the cores
            def run():
                all_cores = torch.get_num_threads()
                share_cpu_cores(APP.max_concurrent_runs)
                try:
                    library_only(steps)
                finally:
                    torch.set_num_threads(all_cores)

            worker = threading.Thread(target=run)
            worker.start()
            worker.join()

        times = side_by_side(
            {
                "run alone, as the server runs it": library_as_the_server_runs_it,
                "run alone, all cores": library_only,
                "streamed, client fetches pictures": lambda: streamed(clients["pictures"]),
                "streamed, client takes data only": lambda: streamed(clients["data only"]),
                "first and last step only, data only": lambda: streamed(clients["unstreamed"], record=False),
                "one-step run alone, as served": lambda: library_as_the_server_runs_it(1),
                "one-step run streamed, data only": lambda: streamed(clients["data only"], 1),
            },
            args.repeats,
        )
    finally:
        server.kill()
        unstreamed_server.kill()
    as_served, fastest = times["run alone, as the server runs it"], times["run alone, all cores"]
    per_request = times["one-step run streamed, data only"] - times["one-step run alone, as served"]
    beyond = times["streamed, client takes data only"] - as_served - per_request
    streaming_ratio = times["streamed, client takes data only"] / times["first and last step only, data only"]
    lines = [
        header("Streaming", model),
        f"settings: {shape}; server in its own process; {args.repeats} alternating repeats; median seconds",
        f"first streamed step (click to first update, via gradio_client): {statistics.median(first_steps):.3f} s (max {max(first_steps):.3f} s)",
        *(f"{name:36s} {seconds:7.3f} s  ({seconds / as_served:.3f}x the run as served, {seconds / fastest:.3f}x with all cores)" for name, seconds in times.items()),
        f"the app's cost per request (a one-step run streamed minus the same run alone; the final update included): {per_request:.3f} s",
        f"Gradio's own floor, for comparison (an endpoint that streams its input back once): {floor:.3f} s",
        f"streaming beyond that cost (data-only client): {beyond:+.3f} s = {beyond / as_served:+.1%} of the run as served",
        f"streamed / the same app sending its first and last step only (side by side, data-only clients): {streaming_ratio:.3f}x",
        f"updates with pictures per run: median {statistics.median(drawn):.0f} of {shape['steps']} steps "
        f"(every step's numbers are sent; on the CPU pictures go out while that takes <= {APP.cpu_stream_share:.0%} of the time)",
    ]
    save("streaming", "\n".join(lines) + "\n")


if __name__ == "__main__":
    measuring = threading.Thread(target=main)  # the main thread stays free of PyTorch work, as in the server
    measuring.start()
    measuring.join()

"""Soak: 200 sequential runs on the embedded model; resident memory before and after (target growth <= 50 MB).

Each run is streamed and stored in a Session (bounded), as the app does. Run: python benchmarks/soak.py
"""

import gc
import time

from common import benchmark_model, header, parser, save
from explainer.run import RunSettings, stream_runs
from ui.session import Session

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_run(model, shape, session, index):
    prompt = f"a {COLOURS[index % 6]} {SHAPES[index % 3]} {PLACES[index % 5]}"
    runs = []
    for kind, which, item in stream_runs(model, [RunSettings(prompt=prompt, seed=index, per_group=True, **shape)]):
        if kind == "start":
            runs.append(item)
            session.add(runs)
        elif kind == "step":
            runs[which].records.append(item)


def main() -> None:
    cli = parser(__doc__)
    cli.add_argument("--runs", type=int, default=200)
    args = cli.parse_args()
    model, shape = benchmark_model(args.model)
    session = Session()
    for index in range(10):  # warm-up: caches, allocator pools, a full session
        one_run(model, shape, session, index)
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    samples = []
    for index in range(args.runs):
        one_run(model, shape, session, index)
        if index % 20 == 19:
            gc.collect()
            samples.append(f"{index + 1}:{rss_mb():.0f}")
    gc.collect()
    after = rss_mb()
    session.close()
    lines = [
        header("Soak", model),
        f"{args.runs} sequential runs, {shape}, session bounded to {session.limit} runs, {time.perf_counter() - start:.0f} s",
        f"resident memory after warm-up {before:.0f} MB, after the runs {after:.0f} MB: growth {after - before:+.1f} MB (target <= 50 MB)",
        "RSS every 20 runs (run:MB): " + " ".join(samples),
    ]
    save("soak", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

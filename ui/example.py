"""The first view's example: a finished run of the default model's first example prompt, made once
when the app starts, so that a visitor sees the denoising, the word maps and the concept chart
before pressing anything. Each visitor gets it in a session of their own, to scrub and explain."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import gradio as gr

from explainer import config, export
from explainer.run import RunData

from . import denoise, gpu, settings
from .page import DEFAULT_MODEL, DEFAULT_SPEC
from .session import OUTPUT_ROOT, Session

log = logging.getLogger("diffusion_xray")
_MADE: Future | None = None


def settings_of_example():
    """The example's settings: the Run button's defaults with the first example prompt."""
    defaults = config.DEFAULTS
    return denoise.run_settings(DEFAULT_MODEL, DEFAULT_SPEC.examples[0], "", defaults.seed, DEFAULT_SPEC.steps,
                                DEFAULT_SPEC.guidance, DEFAULT_SPEC.width, DEFAULT_SPEC.height, defaults.schedule,
                                defaults.concentration, "")


def make() -> tuple[list[RunData], str]:
    """Run the example on this machine (the default model runs on a CPU) with every step decoded,
    and write its animation once for every visitor."""
    runs: list[RunData] = []
    for runs, _ in denoise.collect(DEFAULT_MODEL, [settings_of_example()], runner=gpu.run_here):
        pass
    gpu.decode(DEFAULT_MODEL, runs[0].records)
    folder = OUTPUT_ROOT / "example"
    folder.mkdir(parents=True, exist_ok=True)
    return runs, str(export.animation(runs[0], folder / f"{export.file_stem(runs[0])}.gif"))


def start() -> None:
    """Make the example in the background (once); ``first_view`` waits for it."""
    global _MADE
    if _MADE is None and not DEFAULT_SPEC.needs_gpu:
        _MADE = ThreadPoolExecutor(1, thread_name_prefix="example").submit(make)


def ready(timeout: float | None = None) -> bool:
    """Wait up to ``timeout`` seconds for the example; whether there is one now."""
    if _MADE is None:
        return False
    try:
        _MADE.result(timeout=timeout)
        return True
    except Exception:
        return False


def first_view(session: Session | None) -> tuple:
    """The Run button's page outputs for the example: its last step, the visitor's session holding
    it, and what a finished run fills. Leaves everything as it is when the visitor has run
    something already, or when there is no example (it failed: the log says why)."""
    outputs = denoise.PAGE_OUTPUTS
    if _MADE is None or (session is not None and session.groups):
        return (gr.skip(),) * outputs
    try:
        runs, gif = _MADE.result(timeout=settings.APP.example_wait_s)
    except TimeoutError:  # a busy machine: this visitor's page works without it, a later one gets it
        log.warning("the example run was not ready after %s s; this page opens without it", settings.APP.example_wait_s)
        return (gr.skip(),) * outputs
    except Exception as error:  # the page still works without it
        log.warning("the example run is not available: %s", error)
        return (gr.skip(),) * outputs
    session = Session()
    session.add(runs)
    view = list(denoise.step_view(runs, len(runs[0].records)))
    view[denoise.STATUS] = (f"**An example run**: “{runs[0].settings.prompt}”, seed {runs[0].settings.seed}. "
                            f"Drag the step slider to look back, or type your own prompt and press **Run**.  \n"
                            + view[denoise.STATUS])
    return (*view, gr.skip(), session, gr.skip(), *denoise.after_run(session, gif).values())  # the example has no run id

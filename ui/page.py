"""What every tab shares: refusals, the page/API twins of an action, and a few common controls.

Every action is wired twice (``serve_both``): a private event for the page, which keeps the last
results on a refusal and says why on the tab's notice line (``on_page``), and a named endpoint on a
hidden button, where a refusal raises with its message. A refused request is one log line.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import tempfile
from pathlib import Path

import anyio
import gradio as gr
from gradio import mcp, processing_utils

from explainer import config

log = logging.getLogger("diffusion_xray")
DEFAULT_MODEL = config.default_model_id()
DEFAULT_SPEC = config.MODELS[DEFAULT_MODEL]


def refusal(endpoint: str, error: Exception | str) -> gr.Error:
    """A refused request: one log line (the caller's input, not a fault of the app: no traceback)
    and the error that carries the message to the page or the API caller."""
    log.warning("refused %s: %s", endpoint, error)
    return gr.Error(str(error), print_exception=False)


def save_picture_atomically(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's ``save_pil_to_cache``, but a picture's file is renamed into place, never rewritten.

    The cache is addressed by content, so visitors who get the same picture at once (the same
    noise-level chart, say) share one file; Gradio rewrites it in place on every save, and a
    download running meanwhile reads a truncated file (the client sees "peer closed connection").
    """
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    target = (folder / f"{name}.{format}").resolve()
    if target.exists():  # complete: only a rename puts it there
        os.utime(target)  # the cache deletes by age; this copy is handed out again
        return str(target)
    handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(target)


async def every_tool_output(self, job) -> list:
    """Gradio's MCP server without progress reports (``GradioMCPServer._execute_tool_without_progress``),
    but a tool's outputs one by one, as with progress reports. Gradio 6.31 takes the client's tuple
    of outputs for one output: an agent got a single text of it, and a tool with a session output
    (``/denoise``) failed with "pop index out of range"."""
    result = await anyio.to_thread.run_sync(job.result)
    return list(result) if isinstance(result, tuple) else [result]  # a tuple: several outputs (JSON has none)


class XRayBlocks(gr.Blocks):
    """gr.Blocks whose refusals by Gradio itself (a slider's bound, a choice not in a list) are one
    log line each, as the app's own are, instead of a traceback, whose pictures are cached with
    ``save_picture_atomically`` and whose MCP tools return every output (``every_tool_output``; both
    for every Blocks in the process: the cache and the MCP server are Gradio's)."""

    def __init__(self, *args, **kwargs):
        processing_utils.save_pil_to_cache = save_picture_atomically
        mcp.GradioMCPServer._execute_tool_without_progress = every_tool_output
        super().__init__(*args, **kwargs)

    async def process_api(self, block_fn, *args, **kwargs):
        try:
            return await super().process_api(block_fn, *args, **kwargs)
        except gr.Error as error:
            if error.print_exception:
                function = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
                raise refusal(f"/{function.api_name or function.name}", error.message) from error
            raise


def on_page(handler, outputs: int, notice: int | None = None):
    """The page's twin of an API handler. A refused request (or a fault) leaves every output as it
    was, so the last good results stay on the page, and says what happened in output ``notice``
    and in a toast; the API twin raises instead, so that a client gets the message as an error.
    ``notice=None``: the page's version has one more output, the tab's notice line, cleared on success."""
    count = outputs + (notice is None)
    where = count - 1 if notice is None else notice

    def refused(message: str) -> tuple:
        gr.Warning(message)
        update = [gr.skip()] * count
        update[where] = f"⚠️ **Refused:** {message}  \nThe results shown are from before."
        return tuple(update)

    def with_notice(result) -> tuple:
        result = result if isinstance(result, tuple) else (result,)
        return (*result, "") if notice is None else result

    def failed(error: Exception) -> tuple:
        if isinstance(error, gr.Error):
            return refused(error.message)  # logged where it was raised
        log.exception("%s failed", handler.__name__)  # a fault of the app: the trace goes to the log
        return refused(f"something went wrong ({type(error).__name__}: {error}).")

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args):
            try:
                for result in handler(*args):
                    yield with_notice(result)
            except Exception as error:
                yield failed(error)
        return stream

    @functools.wraps(handler)
    def call(*args):
        try:
            return with_notice(handler(*args))
        except Exception as error:
            return failed(error)
    return call


def serve_both(trigger, handler, inputs, outputs, api_name, notice, page_handler=None, page_inputs=None, page_outputs=None,
               **options):
    """Wire one action twice: ``trigger`` runs it for the page (private; refusals are shown on
    ``notice``, see ``on_page``), and a hidden twin serves ``handler`` as the named endpoint
    ``api_name`` with its own inputs and outputs, where refusals raise with their message. The page
    may run another handler (``page_handler``) on other inputs and outputs (``page_inputs``, ``page_outputs``)."""
    page_outputs = page_outputs or outputs
    at = [i for i, output in enumerate(page_outputs) if output is notice]
    if at:
        page = on_page(page_handler or handler, len(page_outputs), notice=at[0])
    else:
        page, page_outputs = on_page(page_handler or handler, len(page_outputs)), page_outputs + [notice]
    trigger.click(page, page_inputs or inputs, page_outputs, api_name=f"page_{api_name}", api_visibility="private", **options)
    gr.Button(visible=False).click(handler, inputs, outputs, api_name=api_name, **options)


def run_id_input() -> gr.Textbox:
    """The last input of every endpoint that reads a finished run: a run id from ``/denoise`` names
    the run (a caller without a session of its own, such as an MCP agent, needs one); empty, as on
    the page, reads the session's latest run."""
    return gr.Textbox("", visible=False, label="Run id (from /denoise or /explain_image; empty: this session's latest run)")


class StepSlider(gr.Slider):
    """A slider for a step of the latest run. On the page its maximum follows the run; a request is
    checked against the run's own step count by the handler, not against the maximum the slider had
    when the page was built (an API client never sees the page's updates)."""

    is_template = True  # drawn as a gr.Slider

    def preprocess(self, payload: float) -> float:
        gr.Number.raise_if_out_of_bounds(payload, self.minimum, None)
        return gr.Number.round_to_precision(payload, self.precision)


def step_slider(value: int, label: str = "Step", **options) -> StepSlider:
    """A ``StepSlider`` over the default model's steps (a run's own replace them), at ``value``."""
    return StepSlider(1, DEFAULT_SPEC.steps, value=value, step=1, label=label, **options)


def model_choices(on_gpu: bool) -> list[tuple[str, str]]:
    """The model dropdown's (label, id) pairs, the listed models first and the tiny test models last; on
    a machine without a GPU the models that need one say so. An embedded model whose weights are not
    in assets/ (not trained here yet) is left out."""
    present = [spec for spec in config.MODELS.values() if not config.weights_missing(spec)]
    ordered = sorted(present, key=lambda spec: not (spec.listed or spec.id == DEFAULT_MODEL))
    return [(spec.label + (" — needs a GPU, none here" if spec.needs_gpu and not on_gpu else ""), spec.id) for spec in ordered]


MIN_MAX_TICKS = ("least", "", "", "", "most")  # the colour bar of a map drawn min-max
ABOUT_FILE = config.REPO_ROOT / "docs" / "about.md"


@functools.cache
def about_sections() -> dict[str, str]:
    """docs/about.md's "## " sections by title: the text of each tab's "More" fold."""
    sections, title = {}, None
    for line in ABOUT_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = []
        elif title is not None:
            sections[title].append(line)
    return {title: "\n".join(lines).strip() for title, lines in sections.items()}


def intro(caption: str, section: str) -> None:
    """A tab's one-line caption, and its "More" fold with docs/about.md's section ``section``."""
    gr.Markdown(caption)
    with gr.Accordion("More", open=False):
        gr.Markdown(about_sections()[section])


def colour_bar(picture, **options) -> gr.Image:
    """A colour bar under a map: a picture only (no label, frame or buttons)."""
    return gr.Image(value=picture, show_label=False, interactive=False, height=70, container=False, buttons=[], **options)


def notice_line():
    """The line under a tab's button that says what was refused (empty while all is well)."""
    return gr.Markdown("", elem_classes="notice")

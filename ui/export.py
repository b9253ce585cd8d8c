"""The Export tab (the latest run as a ZIP and a GIF) and the About tab."""

from __future__ import annotations

import gradio as gr

from explainer import export

from . import gpu
from .page import about_sections, notice_line, refusal, run_id_input, serve_both
from .session import by_run_id, current



def export_run(session, run_id=""):
    """A finished run as files to download: a ZIP of every step's pictures, its attention maps (.npy
    and .png) and run.json (every setting and library version needed to make it again), and its
    animation.

    Args:
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        the ZIP file
        the animation (GIF)
    """
    try:
        session = by_run_id(session, run_id)
        run = current(session)[0]
        if not run.done:
            raise ValueError("The run is still going; export when it has finished.")
    except ValueError as error:
        raise refusal("/export", error) from error
    gpu.decode(run.model_id, run.records)  # every step's pictures go into the archive
    archive = export.export_zip(run, session.file(f"{export.file_stem(run)}.zip"))
    gif = export.animation(run, session.file(f"{export.file_stem(run)}.gif"))
    return str(archive), str(gif)


def build(session: gr.State) -> None:
    """The Export tab in the current Blocks context; its button serves ``/export``."""
    gr.Markdown("Download the latest run: every step's pictures, attention maps (.npy and .png) and `run.json`, which "
                "records every setting and library version needed to make it again.")
    button = gr.Button("Export the latest run")
    notice = notice_line()
    with gr.Row():
        archive, gif = gr.File(label="Run (ZIP)"), gr.File(label="Animation (GIF)")
    serve_both(button, export_run, [session, run_id_input()], [archive, gif], "export", notice=notice)
    gr.Markdown(API_USE)


API_USE = """### From Python
Every action on this page is a named endpoint that returns data ("Use via API" at the foot of the page lists them
with their arguments):

```python
from gradio_client import Client

client = Client("THIS_PAGE_ADDRESS")  # or a Space's name, e.g. "user/diffusion-xray"
*last_step, data = client.predict("embedded/shapes-ldm", "a red circle on the left", "", "", 1, 20, 5.0, 64, 64, "uniform",
                                  60, "", api_name="/denoise")
run_id = data["run_id"]
word_map = client.predict("circle", 20, "this step", 1, 20, [], "prediction", 0.8, False, "first prompt", run_id,
                          api_name="/attention")  # run_id "": this client's latest run
```

Each call returns what the page shows: pictures as files, maps as `.npy` files and the numbers as JSON.
The repository's README walks through every endpoint.

### From an AI agent (MCP)
The same endpoints are MCP tools at this page's address followed by `gradio_api/mcp/`. Pass the `run_id` that the
`denoise` tool returns to the others: over MCP no caller has a session of its own. This run's id is in the Denoise
tab's Data fold.
"""


def about() -> None:
    """The About tab's text (docs/about.md's "About" section) in the current Blocks context."""
    gr.Markdown(about_sections()["About"])

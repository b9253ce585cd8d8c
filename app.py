"""Diffusion X-Ray: the Gradio app. Assembles the tabs of ``ui/`` (each with its components,
handlers and events) and serves them; all computing is in ``explainer/``."""

from __future__ import annotations

import logging

import gradio as gr

from explainer import config
from explainer.models import share_cpu_cores
from ui import attention, concepts, denoise, example, export, gpu, image, saliency, settings
from ui.page import DEFAULT_MODEL, XRayBlocks
from ui.session import OUTPUT_ROOT, close

gpu.preload_models()
example.start()


def build_demo() -> gr.Blocks:
    """The page: the Denoise, Words, Concepts, Why here, Image, Export & API and About tabs, one visitor's
    session shared by them, and the queue; a finished example on the first view. Every named
    endpoint has a twin event for the page."""
    with XRayBlocks(title="Diffusion X-Ray", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Diffusion X-Ray\nWatch a text-to-image diffusion model turn noise into an image, step by step: "
            "what it currently believes the image is, where each word of the prompt is attended, and which "
            "concept it is drawing."
        )
        if DEFAULT_MODEL == config.TINY_RANDOM_MODEL_ID:
            gr.Markdown(
                "⚠️ **Running on a tiny random model**: the embedded shapes model is not in `assets/` yet, "
                "so the pictures and maps below mean nothing. They show the app working."
            )
        session = gr.State(None, delete_callback=close)
        with gr.Tab("Denoise"):
            denoise_tab = denoise.build()
        with gr.Tab("Words"):
            attention_tab = attention.build(session)
            attention.follow_model(attention_tab, denoise_tab.model_id)
        with gr.Tab("Concepts"):
            concepts_tab = concepts.build(session, denoise_tab)
        with gr.Tab("Why here"):
            saliency_tab = saliency.build(session)
        with gr.Tab("Image"):
            image_tab = image.build_tab()
        with gr.Tab("Export & API"):
            export.build(session)
        with gr.Tab("About"):
            export.about()
        # the run fills the other tabs: wired once they exist
        run_outputs = denoise.wire_run(denoise_tab, session, concepts=concepts_tab, attention=attention_tab, saliency=saliency_tab)
        image.wire_run(image_tab, session, denoise.filled_by_run(denoise_tab, attention_tab, saliency_tab))
        demo.load(example.first_view, session, run_outputs, api_visibility="private")  # the first view: a finished example
    demo.queue(max_size=settings.APP.max_queue, default_concurrency_limit=settings.APP.max_concurrent_runs)
    _poll_queue_less(demo)
    return demo


def _poll_queue_less(demo: gr.Blocks) -> None:
    """Let Gradio's queue look for new events every ``APP.queue_poll_s`` instead of every 1 ms,
    and for progress every ``APP.progress_poll_s`` (Gradio 6 has no public setting for either;
    a test checks that they reach the queue's loops)."""
    queue = demo._queue
    queue.sleep_when_free = max(queue.sleep_when_free, settings.APP.queue_poll_s)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, settings.APP.progress_poll_s)


demo = build_demo()


def serve() -> None:
    """Start the server as ``python app.py`` does."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    share_cpu_cores(settings.APP.max_concurrent_runs)  # a CPU server: each concurrent run gets its cores
    example.ready(timeout=settings.APP.example_wait_s)  # the first visitor sees it at once
    demo.launch(allowed_paths=[str(OUTPUT_ROOT)], mcp_server=True)  # every named endpoint is also an MCP tool


if __name__ == "__main__":
    serve()

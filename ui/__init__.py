"""The Space: the Gradio page and named API endpoints over the ``explainer`` library."""

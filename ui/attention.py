"""The Attention tab: one word's cross-attention map of the latest run, at a step, over a range of
steps or over all of them, for chosen layer groups."""

from __future__ import annotations

import gradio as gr
import numpy as np

from explainer import config
from explainer.render import charts, pictures, views
from explainer.run import RunData, StepRecord

from . import gpu
from .page import (DEFAULT_SPEC, MIN_MAX_TICKS, colour_bar, intro, notice_line, on_page, refusal, run_id_input, serve_both,
                   step_slider)
from .session import by_run_id, check_step, current

AGGREGATIONS = ["this step", "range of steps", "all steps"]


class AttentionTab:
    """The Attention tab's components, by name; a finished run fills ``word``, ``step``, ``start``,
    ``end`` and ``groups``."""

    def __init__(self):
        intro("Pick a word of the prompt and see where the picture looks at it: at one step, over a range of steps, "
              "or over the whole run, and in which of the model's layers.", "Words")
        with gr.Row():
            with gr.Column(scale=1):
                self.word = gr.Dropdown(label="Word", choices=[], allow_custom_value=True)
                self.include_special = gr.Checkbox(label="Show start / end / padding tokens", value=False,
                                                   info="The start token takes much of the attention everywhere and says little.")
                self.aggregation = gr.Radio(AGGREGATIONS, value="this step", label="Aggregate")
                self.step = step_slider(DEFAULT_SPEC.steps)
                with gr.Row():
                    self.start = step_slider(1, "Range start")
                    self.end = step_slider(DEFAULT_SPEC.steps, "Range end")
                # a dropdown, not checkboxes: its choices come from the run, and an API client (which
                # never sees them filled) may still name a group; the handler checks the name
                self.groups = gr.Dropdown(label="Layers (block and resolution; empty = all)", choices=[], value=[],
                                          multiselect=True, allow_custom_value=True)
                self.view = gr.Radio(["prediction", "noisy"], value="prediction", label="Picture under the map")
                self.opacity = gr.Slider(0, 1, value=0.8, step=0.05, label="Overlay opacity")
                self.which = gr.Radio(["first prompt", "second prompt"], value="first prompt", label="Prompt")
                self.show = gr.Button("Show", variant="primary")
                self.notice = notice_line()
            with gr.Column(scale=2):
                self.overlay = gr.Image(label="Where the picture looks at the word (click a spot: where does it look?)",
                                        type="pil", height=420, elem_id="word-map", interactive=False)
                colour_bar(charts.colour_bar("this map, from its least to its most", MIN_MAX_TICKS))
                self.spot_notice = notice_line()
                with gr.Row():
                    self.spot_map = gr.Image(label="Where the clicked spot looks in the picture", type="pil", height=300,
                                             elem_id="spot-map")
                    self.spot_words = gr.Image(label="Which words the clicked spot looks at", show_label=False, type="pil",
                                               height=300)
        gr.Markdown("### Concepts, in or out of the prompt\nOn a model whose blocks attend jointly over picture and text "
                    "(Stable Diffusion 3, FLUX.1), any words can be followed through the model without changing the picture: "
                    "where each is drawn, as shares of every spot (ConceptAttention), and where the picture looks for it.")
        with gr.Row():
            self.concepts = gr.Textbox(", ".join(DEFAULT_SPEC.concepts), label="Concepts (words, commas between)", scale=3)
            self.concept_blocks = gr.Radio(["all", "last half"], value="all", label="Blocks", scale=1,
                                           info="The deeper half often separates concepts best.")
            self.concept_button = gr.Button("Show concepts", scale=1)
        self.concept_notice = notice_line()
        with gr.Row():
            # fit_columns=False: one or two concepts keep quarter-width cells, not the whole row
            self.concept_maps = gr.Gallery(label="Where each concept is drawn (shares of every spot)", columns=4,
                                           height="auto", elem_id="concept-maps", fit_columns=False)
            self.concept_raw = gr.Gallery(label="Where the picture looks for each concept (raw attention)", columns=4,
                                          height="auto", fit_columns=False)
        with gr.Accordion("Data", open=False):
            with gr.Row():
                self.npy = gr.File(label="The map as numbers (.npy, one value per latent cell)")
                self.summary = gr.JSON(label="The map's summary")
                self.spot_data = gr.JSON(label="The clicked spot")
                self.concept_data = gr.JSON(label="The concepts")


def attention(word, step, aggregation, start, end, groups, view, opacity, include_special, which, session, run_id=""):
    """Where the picture looks at one word of the prompt (its cross-attention map) in a finished run:
    at a step, over a range of steps, or over all steps, in chosen layer groups.

    Args:
        word: A word of the prompt, as in the "words" of /denoise's data ("<start>", "<end>", "<padding>" with include_special).
        step: The step (1-based) shown when aggregation is "this step", and whose picture is under the map.
        aggregation: "this step", "range of steps" (from start to end) or "all steps".
        start: The first step of the range (1-based), used when aggregation is "range of steps".
        end: The last step of the range (1-based, not before start), used when aggregation is "range of steps".
        groups: Layer groups to sum, such as "up 16×16" (the names are in the summary); an empty list sums all layers.
        view: The picture under the map: "prediction" (the predicted finished image) or "noisy" (the noisy image).
        opacity: How strongly the map covers the picture, from 0 to 1.
        include_special: Whether the start, end and padding tokens may be chosen as the word.
        which: "first prompt", or "second prompt" for a run made with a second prompt.
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        the map over the picture
        the map as a .npy file (one value per latent cell)
        a JSON summary (steps, layers, min, max)
    """
    try:
        session, run = chosen_run(session, run_id, which)
        labels = views.token_labels(run, include_special)
        if word not in labels:
            raise ValueError(f"The word {word!r} is not in the prompt. Its words are: {', '.join(map(repr, labels))}.")
        chosen = _steps_for(run, aggregation, int(step), int(start), int(end))
        saliency = views.word_map(run, labels.index(word), chosen, include_special, groups)
    except ValueError as error:
        raise refusal("/attention", error) from error
    gpu.decode(run.model_id, [chosen[-1]])
    picture = pictures.for_display(pictures.step_picture(chosen[-1], view), 320)
    path = session.file(f"attention-{word}-{chosen[0].index}-{chosen[-1].index}.npy")
    np.save(path, saliency)
    summary = {
        "word": word,
        "steps": [r.index for r in chosen],
        "groups": list(dict.fromkeys(groups)) if groups else "all",
        "layers": [key for g in dict.fromkeys(groups) for key in views.layer_groups(run)[g]] if groups else "all",
        "min": float(saliency.min()),
        "max": float(saliency.max()),
        "shape": list(saliency.shape),
    }
    return pictures.overlay(picture, saliency, float(opacity)), str(path), summary


def spot(x, y, step, which, session, run_id=""):
    """Where one spot of the picture looks at a step of a finished run: its self-attention over the
    picture and the share of its attention that goes to each word of the prompt.

    Args:
        x: The spot's place across the picture, as a fraction of its width (0 left, 1 right).
        y: The spot's place down the picture, as a fraction of its height (0 top, 1 bottom).
        step: The step of the run (1-based).
        which: "first prompt", or "second prompt" for a run made with a second prompt.
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        the spot's self-attention over the picture, the spot marked
        a bar chart of its attention per word
        both as JSON
    """
    try:
        session, run = chosen_run(session, run_id, which)
        check_step(run, step)
        for name, value in (("x", x), ("y", y)):
            if not 0 <= float(value) <= 1:
                raise ValueError(f"{name} must be a fraction of the picture between 0 and 1, got {value}.")
        height, width = run.latent_size
        row, column = min(int(float(y) * height), height - 1), min(int(float(x) * width), width - 1)
        found = gpu.spot_on_device(run.model_id, run.for_computing(), int(step), row, column)
    except ValueError as error:
        raise refusal("/spot", error) from error
    record = run.records[int(step) - 1]
    gpu.decode(run.model_id, [record])
    picture = pictures.mark_spot(pictures.overlay(pictures.for_display(pictures.step_picture(record, "prediction"), 320),
                                                  found.saliency), float(x), float(y))
    words = charts.token_bars(found.token_scores, f"The spot's attention per word, step {found.step}",
                              "share of the spot's attention")
    data = {"step": found.step, "row": row, "column": column, "words": found.token_scores,
            "seconds": round(found.seconds, 3)}
    return picture, words, data


def concept_maps(concepts, step, blocks, which, session, run_id=""):
    """ConceptAttention: where each of some concepts is drawn at a step of a finished run, on a model
    whose blocks attend jointly over picture and text (Stable Diffusion 3, FLUX.1); the concepts need
    not be in the prompt, and the picture does not change.

    Args:
        concepts: The concepts, as words with commas between, e.g. "circle, square, background".
        step: The step of the run (1-based).
        blocks: The blocks whose attention is used: "all" or "last half" (the deeper half).
        which: "first prompt", or "second prompt" for a run made with a second prompt.
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        per concept its share of every spot, over the picture
        per concept where the picture looks for it (raw attention)
        as JSON each concept's share of the picture
    """
    try:
        session, run = chosen_run(session, run_id, which)
        check_step(run, step)
        words = tuple(word.strip() for word in (concepts or "").split(",") if word.strip())
        if not words:
            raise ValueError("Give one or more concepts, as words with commas between.")
        found = gpu.concept_maps_on_device(run.model_id, run.for_computing(), int(step), words, blocks)
    except ValueError as error:
        raise refusal("/concept_maps", error) from error
    record = run.records[int(step) - 1]
    gpu.decode(run.model_id, [record])
    picture = pictures.for_display(pictures.step_picture(record, "prediction"), 256)
    shares = [(pictures.overlay(picture, values, scale=1.0), f"{key.split(':', 1)[1]} · {found.token_scores[key]:.0%} of the picture")
              for key, values in found.token_maps.items()]
    raw = [(pictures.overlay(picture, values), key.split(":", 1)[1]) for key, values in found.per_layer.items()]
    return shares, raw, {"step": found.step, "blocks": blocks, "shares": found.token_scores, "seconds": round(found.seconds, 3)}


def spot_on_page(overlay, step, which, session, selected: gr.SelectData):
    """A click on the word map: ``spot`` at the clicked place."""
    if overlay is None:
        raise refusal("/spot", "Show a word's map first, then click a spot on it.")
    x, y = selected.index
    return spot(x / overlay.width, y / overlay.height, step, which, session)


def _steps_for(run: RunData, aggregation: str, step: int, start: int, end: int) -> list[StepRecord]:
    for name, value in (("step", step), ("range start", start), ("range end", end)):
        check_step(run, value, name)
    if aggregation == "this step":
        return [run.records[step - 1]]
    if aggregation == "range of steps":
        if start > end:
            raise ValueError(f"range start ({start}) must not be after range end ({end}).")
        return run.records[start - 1 : end]
    if aggregation == "all steps":
        return list(run.records)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")


def chosen_run(session, run_id: str, which: str) -> tuple:
    """The session holding the run ``run_id`` names (or the caller's, for its latest run) and that
    run's first or second prompt's run (``which``); a ValueError if there is no such run."""
    session = by_run_id(session, run_id)
    runs = current(session)
    if which == "second prompt" and len(runs) < 2:
        raise ValueError("The run has no second prompt.")
    return session, runs[1 if which == "second prompt" else 0]


def follow_model(tab: AttentionTab, model_id: gr.Dropdown) -> None:
    """The concepts box starts from the chosen model's own words (``ModelSpec.concepts``)."""
    model_id.change(lambda chosen: ", ".join(config.model_spec(chosen).concepts), model_id, tab.concepts,
                    api_visibility="private")


def build(session: gr.State) -> AttentionTab:
    """The Attention tab in the current Blocks context; its Show button serves ``/attention``."""
    tab = AttentionTab()
    run_id = run_id_input()
    inputs = [tab.word, tab.step, tab.aggregation, tab.start, tab.end, tab.groups, tab.view, tab.opacity, tab.include_special,
              tab.which, session, run_id]
    serve_both(tab.show, attention, inputs, [tab.overlay, tab.npy, tab.summary], "attention", notice=tab.notice)
    spot_outputs = [tab.spot_map, tab.spot_words, tab.spot_data]
    tab.overlay.select(on_page(spot_on_page, len(spot_outputs)), [tab.overlay, tab.step, tab.which, session],
                       spot_outputs + [tab.spot_notice], api_visibility="private", **gpu.queue())
    spot_x, spot_y = gr.Number(visible=False), gr.Number(visible=False)  # the API's place of the spot
    gr.Button(visible=False).click(spot, [spot_x, spot_y, tab.step, tab.which, session, run_id], spot_outputs, api_name="spot",
                                   **gpu.queue())
    concept_outputs = [tab.concept_maps, tab.concept_raw, tab.concept_data]
    serve_both(tab.concept_button, concept_maps, [tab.concepts, tab.step, tab.concept_blocks, tab.which, session, run_id],
               concept_outputs, "concept_maps", notice=tab.concept_notice, **gpu.queue())
    return tab

"""The Concepts tab: which concept is drawn at each step, by a quick score of the recorded attention
(each word's peak, or the paper's attention mass) or by token relevance (gradient), and the Denoise
tab's prompt under the three schedules side by side."""

from __future__ import annotations

import gradio as gr

from explainer import config
from explainer.methods import TokenRelevance
from explainer.methods.base import RECTIFIERS
from explainer.methods.relevance import ATTENTION_SCORES
from explainer.render import charts, pictures, views
from explainer.run import RunData

from . import gpu
from .denoise import DenoiseTab, run_settings, stream, up_to
from .page import intro, notice_line, refusal, serve_both
from .session import current

RELEVANCE_RECTIFY_INFO = ("abs: counts whatever way a word pushes the model's result; relu (the paper's): only the way "
                          "that raises it, which misses part of what the model draws")
QUICK_SCORES = [("each word's peak (recommended)", "peak"), ("attention mass (the paper's)", "mass")]
QUICK_SCORE_INFO = ("Peak: how strongly the spot that looks at a word most looks at it, relative to the strongest word. "
                    "Mass: how much attention the word gets over the whole picture, which favours words spread evenly.")


class ConceptsTab:
    """The Concepts tab's components, by name; the Denoise tab's step view draws ``chart`` too."""

    def __init__(self):
        intro("Which word of the prompt is the model drawing at each step? The chart follows every word through the run.",
              "Concepts")
        with gr.Row():
            with gr.Column():
                self.refresh = gr.Button("Quick score (the run's attention)")
                self.score = gr.Radio(QUICK_SCORES, value=ATTENTION_SCORES[0], label="Quick score", info=QUICK_SCORE_INFO)
            with gr.Column():
                self.relevance = gr.Button("Token relevance (asks the model again, slower)")
                self.rectify = gr.Radio(list(RECTIFIERS), value=TokenRelevance.rectify, label="Relevance counts",
                                        info=RELEVANCE_RECTIFY_INFO)
        self.notice = notice_line()
        with gr.Row():
            self.chart = gr.Image(label="Concept chart", show_label=False, type="pil", format="png", height=300, elem_id="concept-chart")
            self.bars = gr.Image(label="Summed over steps", show_label=False, type="pil", height=300)
        gr.Markdown("### Compare schedules\nThe Denoise tab's prompt and seed under the three schedules (λ from its settings).")
        self.compare = gr.Button("Compare uniform / early / latter", variant="primary")
        self.compare_notice = notice_line()
        self.grid = []  # per schedule: its final image, concept chart and totals
        with gr.Row():
            for kind in config.SCHEDULE_KINDS:
                with gr.Column():
                    self.grid += [
                        gr.Image(label=f"{kind}: image", type="pil", height=200, elem_id=f"{kind}-image"),
                        # the charts carry their own titles, which a label would cover at this height
                        gr.Image(label=f"{kind}: concept chart", show_label=False, type="pil", height=340),
                        gr.Image(label=f"{kind}: totals", show_label=False, type="pil", height=280),
                    ]
        with gr.Accordion("Data", open=False):  # the charts show it; the JSON is for copying
            self.data = gr.JSON(label="Scores per step", max_height=240)
            self.compare_data = gr.JSON(label="Scores per schedule", max_height=240)


def concepts(score, session):
    """Concept chart (the quick score of every word at every step), per-word totals, and the series as
    JSON. ``score``: "peak" (each word's peak attention, relative to the strongest word's) or "mass"
    (the paper's attention mass, min-max per step)."""
    try:
        if score not in ATTENTION_SCORES:
            raise ValueError(f"score must be one of {ATTENTION_SCORES}, got {score!r}.")
        runs = current(session)
    except ValueError as error:
        raise refusal("/concepts", error) from error
    return _concept_outputs(runs[0], "this run", score=score)


def _concept_outputs(run: RunData, title: str, on_time_axis: bool = False, score: str = "peak"):
    series = views.concept_series(run, score)
    steps = list(range(1, len(run.records) + 1))
    totals = {label: float(sum(values)) for label, values in series.items()}
    data = {"steps": steps, "timesteps": run.timesteps, "score": score, "series": series, "totals": totals}
    timesteps = run.timesteps[: len(steps)] if on_time_axis else None
    chart = charts.concept_chart(steps, series, f"Concept chart: {title}", views.SCORE_AXES[score], timesteps=timesteps)
    return chart, charts.token_bars(totals, f"Totals: {title}"), data


def relevance(rectify, session):
    """The paper's concept measure: gradient-weighted attention relevance (docs/methods.md, Token relevance) of every word at
    every step of the latest run (one forward and backward pass per step), as a chart, totals and JSON.
    ``rectify``: "abs" (default) keeps |gradient x attention|, "relu" the paper's positive part."""
    try:
        TokenRelevance(rectify=rectify)  # the option's check, before any GPU work
        run = current(session)[0]
        series = gpu.relevance_on_device(run.model_id, run.for_computing(), rectify)
    except ValueError as error:
        raise refusal("/relevance", error) from error
    totals = {label: float(sum(values)) for label, values in series["scores"].items()}
    data = {"steps": series["steps"], "timesteps": run.timesteps, "score": "token relevance", "rectify": rectify,
            "series": series["scores"], "totals": totals}
    chart = charts.concept_chart(series["steps"], series["scores"], "Concept chart: token relevance (gradient)",
                                 views.SCORE_AXES["relevance"])
    return chart, charts.token_bars(totals, "Relevance summed over steps"), data


def compare_schedules(model_id, prompt, negative, seed, steps, guidance, width, height, concentration):
    """The same prompt and seed under the uniform, early and latter schedules, side by side
    (the paper's Fig. 6 and 11): three final images, three concept charts drawn against the
    model's time (where each schedule's steps fall), three bar charts, JSON."""
    try:
        runs = [run_settings(model_id, prompt, negative, seed, steps, guidance, width, height, kind, concentration, "")
                for kind in config.SCHEDULE_KINDS]
    except ValueError as error:
        raise refusal("/compare_schedules", error) from error
    for now, step, waiting in stream(model_id, runs, "/compare_schedules"):
        if waiting:  # overtaken: every update carries the whole series so far
            continue
        outputs, data = [], {}
        for kind, run in zip(config.SCHEDULE_KINDS, up_to(now, step)):
            picture = run.final_image or pictures.step_picture(run.records[-1], "prediction")
            chart, bars, series = _concept_outputs(run, kind, on_time_axis=True)
            outputs += [pictures.for_display(picture, 256), chart, bars]
            data[kind] = series
        yield *outputs, data


def build(session: gr.State, run: DenoiseTab) -> ConceptsTab:
    """The Concepts tab in the current Blocks context; it serves ``/concepts``, ``/relevance`` and
    ``/compare_schedules`` (the last from the Denoise tab's settings, ``run``)."""
    tab = ConceptsTab()
    outputs = [tab.chart, tab.bars, tab.data]
    serve_both(tab.refresh, concepts, [tab.score, session], outputs, "concepts", notice=tab.notice)
    serve_both(tab.relevance, relevance, [tab.rectify, session], outputs, "relevance", notice=tab.notice, **gpu.queue())
    compare_inputs = [run.model_id, run.prompt, run.negative, run.seed, run.steps, run.guidance, run.width, run.height, run.concentration]
    serve_both(tab.compare, compare_schedules, compare_inputs, tab.grid + [tab.compare_data], "compare_schedules",
               notice=tab.compare_notice, **gpu.queue())
    return tab

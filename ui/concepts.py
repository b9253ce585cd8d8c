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

from . import gpu, settings
from .denoise import DenoiseTab, run_settings, stream, up_to
from .page import intro, notice_line, refusal, run_id_input, serve_both
from .session import by_run_id, current

RELEVANCE_RECTIFY_INFO = ("Whatever way a word pushes the model's result (abs), or only the way that raises it (relu, "
                          "the paper's), which misses part of what the model draws.")
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
        gr.Markdown("### Compare schedules\nThe Denoise tab's prompt and seed under the three schedules, with its settings.")
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
        self.schedule_paths = gr.Image(label="The three runs' paths from noise to picture", type="pil", height=340,
                                       elem_id="schedule-paths")
        gr.Markdown("### Compare guidance\nThe Denoise tab's prompt and seed at several guidance values: how strictly the "
                    "model follows the prompt changes what it draws, and when.")
        with gr.Row():
            self.guidances = gr.Textbox(", ".join(f"{g:g}" for g in settings.APP.compared_guidances),
                                        label=f"Guidance values (up to {settings.APP.max_compared_guidances}, commas between)")
            self.compare_guidance = gr.Button("Compare guidance", variant="primary")
        self.guidance_notice = notice_line()
        self.guidance_grid = []  # per guidance value: its final image and concept chart
        self.guidance_columns = []  # shown for the values given
        with gr.Row():
            for slot in range(settings.APP.max_compared_guidances):
                with gr.Column(min_width=200, visible=slot < len(settings.APP.compared_guidances)) as column:
                    self.guidance_columns.append(column)
                    self.guidance_grid += [
                        gr.Image(label=f"guidance {slot + 1}: image", type="pil", height=200, elem_id=f"guidance-{slot}-image"),
                        gr.Image(label=f"guidance {slot + 1}: concept chart", show_label=False, type="pil", height=300),
                    ]
        self.guidance_paths = gr.Image(label="The runs' paths from noise to picture", type="pil", height=340)
        with gr.Accordion("Data", open=False):  # the charts show it; the JSON is for copying
            self.data = gr.JSON(label="Scores per step", max_height=240)
            self.compare_data = gr.JSON(label="Scores per schedule", max_height=240)
            self.guidance_data = gr.JSON(label="Scores per guidance value", max_height=240)


def concepts(score, session, run_id=""):
    """Which word of the prompt a finished run draws at each step, by a quick score of its recorded
    attention (nothing is computed again).

    Args:
        score: "peak" (each word's peak attention, relative to the strongest word's) or "mass" (the paper's attention mass).
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        a chart of every word's score at every step
        a bar chart of the totals over the steps
        the scores as JSON
    """
    try:
        if score not in ATTENTION_SCORES:
            raise ValueError(f"score must be one of {ATTENTION_SCORES}, got {score!r}.")
        runs = current(by_run_id(session, run_id))
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


def relevance(rectify, session, run_id=""):
    """The paper's concept measure, token relevance: gradient-weighted attention of every word of the
    prompt at every step of a finished run (one forward and backward pass of the model per step).

    Args:
        rectify: "abs" (gradient x attention, whichever way it pushes) or "relu" (only its positive part, the paper's).
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        a chart of every word's relevance at every step
        a bar chart of the totals over the steps
        the relevance as JSON
    """
    try:
        TokenRelevance(rectify=rectify)  # the option's check, before any GPU work
        run = current(by_run_id(session, run_id))[0]
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
    """Three new runs of the same prompt and seed under the uniform, early and latter time-step
    schedules, side by side (the paper's Fig. 6 and 11), streamed step by step.

    Args:
        model_id: The model, one of the ids /denoise accepts (e.g. "embedded/shapes-ldm").
        prompt: What to draw.
        negative: What to steer away from ("" for nothing).
        seed: The starting noise's seed (-1 for a random one).
        steps: How many denoising steps each run takes.
        guidance: How strictly the model follows the prompt (classifier-free guidance scale).
        width: The picture's width in pixels (a multiple of 8).
        height: The picture's height in pixels (a multiple of 8).
        concentration: How strongly the early and latter schedules crowd their steps (λ, 0 or more).

    Returns:
        per schedule its final image, its concept chart (against the model's time) and its bar chart of totals
        the runs' paths from noise to picture
        the scores as JSON
    """
    try:
        runs = [run_settings(model_id, prompt, negative, seed, steps, guidance, width, height, kind, concentration, "")
                for kind in config.SCHEDULE_KINDS]
    except ValueError as error:
        raise refusal("/compare_schedules", error) from error
    for now, step, waiting in stream(model_id, runs, "/compare_schedules"):
        if waiting:  # overtaken: every update carries the whole series so far
            continue
        outputs, data = [], {}
        shown = up_to(now, step)
        for kind, run in zip(config.SCHEDULE_KINDS, shown):
            picture = run.final_image or pictures.step_picture(run.records[-1], "prediction")
            chart, bars, series = _concept_outputs(run, kind, on_time_axis=True)
            outputs += [pictures.for_display(picture, 256), chart, bars]
            data[kind] = series
        yield *outputs, paths_chart(dict(zip(config.SCHEDULE_KINDS, shown)), "The schedules' paths"), data


def paths_chart(runs: dict[str, RunData], title: str):
    """The runs' latent paths on one plane (``views.latent_paths``), labelled by their keys."""
    paths, variance = views.latent_paths(list(runs.values()))
    return charts.trajectory_chart(dict(zip(runs, paths)), variance, title)


def parse_guidances(text: str) -> list[float]:
    """Guidance values from "1, 3, 7.5": two to ``APP.max_compared_guidances`` numbers (a
    ValueError says what is wrong; each run checks its own value)."""
    try:
        values = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"guidance values must be numbers separated by commas, got {text!r}.") from None
    limit = settings.APP.max_compared_guidances
    if not 2 <= len(values) <= limit:
        raise ValueError(f"give between 2 and {limit} guidance values, got {len(values)}.")
    return values


def compare_guidance_on_page(*inputs):
    """``compare_guidance`` for the page, which also shows a column per value given and hides the rest."""
    try:
        count = len(parse_guidances(inputs[-1]))
    except ValueError:
        count = 0  # compare_guidance refuses it, with the message
    shown = [gr.update(visible=slot < count) if count else gr.skip() for slot in range(settings.APP.max_compared_guidances)]
    for update in compare_guidance(*inputs):
        yield *update, *shown


def compare_guidance(model_id, prompt, negative, seed, steps, width, height, schedule, concentration, custom, guidances):
    """New runs of the same prompt and seed at several guidance values, side by side, streamed step
    by step: how strictly the model follows the prompt changes what it draws, and when.

    Args:
        model_id: The model, one of the ids /denoise accepts (e.g. "embedded/shapes-ldm").
        prompt: What to draw.
        negative: What to steer away from ("" for nothing).
        seed: The starting noise's seed (-1 for a random one).
        steps: How many denoising steps each run takes.
        width: The picture's width in pixels (a multiple of 8).
        height: The picture's height in pixels (a multiple of 8).
        schedule: The time-step schedule: "uniform", "early", "latter" or "custom".
        concentration: How strongly the early and latter schedules crowd their steps (λ, 0 or more).
        custom: The timesteps of a "custom" schedule, strictly decreasing with commas between, e.g. "999, 500, 50".
        guidances: Two to four guidance values with commas between, e.g. "1, 3, 7.5".

    Returns:
        per value its final image and concept chart (four slots, None where unused)
        the runs' paths from noise to picture
        the scores as JSON
    """
    try:
        values = parse_guidances(guidances)
        runs = [run_settings(model_id, prompt, negative, seed, steps, value, width, height, schedule, concentration, custom)
                for value in values]
    except ValueError as error:
        raise refusal("/compare_guidance", error) from error
    empty = [None, None] * (settings.APP.max_compared_guidances - len(values))
    for now, step, waiting in stream(model_id, runs, "/compare_guidance"):
        if waiting:  # overtaken: every update carries the whole series so far
            continue
        outputs, data, shown = [], {}, up_to(now, step)
        for value, run in zip(values, shown):
            picture = run.final_image or pictures.step_picture(run.records[-1], "prediction")
            chart, _, series = _concept_outputs(run, f"guidance {value:g}")
            outputs += [pictures.for_display(picture, 256), chart]
            data[f"{value:g}"] = series
        yield *outputs, *empty, paths_chart({f"guidance {v:g}": run for v, run in zip(values, shown)}, "The runs' paths"), data


def build(session: gr.State, run: DenoiseTab) -> ConceptsTab:
    """The Concepts tab in the current Blocks context; it serves ``/concepts``, ``/relevance``,
    ``/compare_schedules`` and ``/compare_guidance`` (the last two from the Denoise tab's settings, ``run``)."""
    tab = ConceptsTab()
    outputs = [tab.chart, tab.bars, tab.data]
    run_id = run_id_input()
    serve_both(tab.refresh, concepts, [tab.score, session, run_id], outputs, "concepts", notice=tab.notice)
    serve_both(tab.relevance, relevance, [tab.rectify, session, run_id], outputs, "relevance", notice=tab.notice,
               **gpu.queue())
    compare_inputs = [run.model_id, run.prompt, run.negative, run.seed, run.steps, run.guidance, run.width, run.height, run.concentration]
    serve_both(tab.compare, compare_schedules, compare_inputs, tab.grid + [tab.schedule_paths, tab.compare_data],
               "compare_schedules", notice=tab.compare_notice, **gpu.queue())
    guidance_inputs = [run.model_id, run.prompt, run.negative, run.seed, run.steps, run.width, run.height, run.schedule,
                       run.concentration, run.custom, tab.guidances]
    guidance_outputs = tab.guidance_grid + [tab.guidance_paths, tab.guidance_data]
    serve_both(tab.compare_guidance, compare_guidance, guidance_inputs, guidance_outputs, "compare_guidance",
               notice=tab.guidance_notice, page_handler=compare_guidance_on_page,
               page_outputs=guidance_outputs + tab.guidance_columns, **gpu.queue())
    return tab

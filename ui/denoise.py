"""The Denoise tab: run the model and stream its steps, then scrub through them; the finished run
fills the other tabs' choices (``AfterRun``). Also the run's settings and stream for the Concepts
tab's schedule comparison."""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr

from explainer import config, export
from explainer.models import check_loadable, load_model
from explainer.render import charts, pictures, views
from explainer.run import RunData, RunSettings
from explainer.schedules import parse_timestep_list

from . import gpu, settings
from .page import DEFAULT_MODEL, DEFAULT_SPEC, colour_bar, intro, model_choices, on_page, refusal, serve_both, step_slider
from .session import RUNS, Session, check_step, current
from .streaming import UpdateBudget, run_ahead

LIMITS = config.LIMITS
CONCEPT_CHART_TITLE = "Concept chart (quick score)"
STATUS, CONCEPTS, DATA = 4, 7, 8  # the status line's, the concept chart's and the data's places among step_view's outputs


class DenoiseTab:
    """The Denoise tab's components, by name: ``denoise``'s settings, the step's views and charts
    (``step_outputs``), the scrubber and the run's animation."""

    def __init__(self):
        intro("Type a prompt and press **Run**: the model turns noise into a picture step by step. The first picture is "
              "what it thinks the finished picture is, the second what it actually holds; under them, where each word is "
              "looked at.", "Denoise")
        with gr.Row():
            with gr.Column(scale=1):
                self.prompt = gr.Textbox(label="Prompt", value=DEFAULT_SPEC.examples[0], max_lines=3)
                self.prompt_b = gr.Textbox("", label="Second prompt (optional): compared from the same starting noise", max_lines=2)
                self.model_id = gr.Dropdown(choices=model_choices(gpu.on_gpu()), value=DEFAULT_MODEL, label="Model")
                with gr.Row():
                    self.seed = gr.Number(label="Seed (-1: random)", value=config.DEFAULTS.seed, precision=0)
                    self.steps = gr.Slider(1, LIMITS.max_steps, value=DEFAULT_SPEC.steps, step=1, label="Steps")
                self.guidance = gr.Slider(0, LIMITS.max_guidance, value=DEFAULT_SPEC.guidance, step=0.5, label="Guidance")
                self.schedule = gr.Radio(["uniform", "early", "latter", "custom"], value=config.DEFAULTS.schedule,
                                         label="Time-step schedule", info="early: dense where noise is high; latter: dense where it is low")
                with gr.Accordion("More settings", open=False):
                    self.negative = gr.Textbox(label="Negative prompt", value="")
                    with gr.Row():
                        sides = dict(minimum=LIMITS.min_side, maximum=LIMITS.max_side, step=LIMITS.side_multiple)
                        self.width = gr.Slider(value=DEFAULT_SPEC.width, label="Width", **sides)
                        self.height = gr.Slider(value=DEFAULT_SPEC.height, label="Height", **sides)
                    self.concentration = gr.Slider(0, settings.APP.concentration_slider_max, value=config.DEFAULTS.concentration, step=1, label="How strongly early and latter crowd the steps")
                    self.custom = gr.Textbox("", label="Custom timesteps (schedule = custom)", placeholder="999, 800, 600, 400, 200, 50")
                    gr.Markdown(f"Limits: up to {LIMITS.max_steps} steps, sides {LIMITS.min_side}–{LIMITS.max_side} px in multiples of {LIMITS.side_multiple}.")
                self.run = gr.Button("Run", variant="primary")
                self.examples = gr.Dataset(components=[self.prompt], samples=[[p] for p in DEFAULT_SPEC.examples], label="Examples")
            with gr.Column(scale=2):
                self.status = gr.Markdown("Press **Run** to start.")
                # Streamed pictures are PNG: cheaper to encode than WebP on a CPU (docs/design.md), and small.
                with gr.Row():
                    self.pred_a = gr.Image(label="What the model thinks the finished image is, now", type="pil", format="png", height=300)
                    self.noisy_a = gr.Image(label="What it actually holds now: the noisy image", type="pil", format="png", height=300)
                with gr.Row(visible=False) as self.second:  # shown when a second prompt is given
                    self.pred_b = gr.Image(label="Second prompt: what the model thinks the image is", type="pil", format="png", height=220)
                    self.noisy_b = gr.Image(label="Second prompt: the noisy image", type="pil", format="png", height=220)
                self.slider = step_slider(1, "Step (drag or type one after the run)", interactive=False)
                # JPEG: a heat-map overlay is smooth colour, which PNG encodes slowly (~9 ms against 0.1 ms for
                # a 128 px overlay, one per word at every streamed overlay update) and 5-8x larger
                self.overlays = gr.Gallery(label="Where each word of the prompt is looked at, at this step", columns=3,
                                           format="jpeg", height="auto", object_fit="contain")
                with gr.Row(equal_height=True):
                    self.scale_bar = colour_bar(word_scale_bar(False), scale=4)
                    self.own_scale = gr.Checkbox(label="Each word on its own scale", value=False, scale=1)
                with gr.Row():
                    self.chart = gr.Image(label="How much noise is left, step by step", show_label=False, type="pil",
                                          format="png", height=220)
                    self.animation = gr.Image(label="The whole run as an animation", type="filepath", height=220)
                    self.paths = gr.Image(label="The path from noise to picture (each dot a step)", type="pil", height=220)
                with gr.Accordion("Data", open=False):
                    self.data = gr.JSON(label="This step's numbers")
                    self.run_id = gr.Textbox(label="Run id", interactive=False, buttons=["copy"],
                                             info="Names this run for the API and MCP tools (their run_id argument).")

    def run_inputs(self) -> list:
        """``denoise``'s inputs but the session, in its order."""
        return [self.model_id, self.prompt, self.prompt_b, self.negative, self.seed, self.steps, self.guidance, self.width,
                self.height, self.schedule, self.concentration, self.custom]

    def step_outputs(self, concept_chart) -> list:
        """``step_view``'s outputs, in its order; the concept chart is the Concepts tab's."""
        return [self.pred_a, self.noisy_a, self.pred_b, self.noisy_b, self.status, self.chart, self.overlays, concept_chart, self.data]


@dataclasses.dataclass
class AfterRun:
    """What a finished run fills, by name: the components when wiring, their updates from ``after_run``."""

    scrubber: Any  # this tab's step slider, opened
    word: Any  # Attention: the prompt's words
    step: Any  # Attention: its step and range of steps
    start: Any
    end: Any
    groups: Any  # Attention: the layer groups
    animation: Any  # this tab's GIF
    paths: Any  # this tab's latent paths (both prompts)
    explained_step: Any  # Saliency: the step it explains

    def values(self) -> list:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


AFTER_RUN_OUTPUTS = len(dataclasses.fields(AfterRun))
STEP_OUTPUTS = 9  # step_view's
# the Run button's on the page: with the run id, the session and the second prompt's row
PAGE_OUTPUTS = STEP_OUTPUTS + 3 + AFTER_RUN_OUTPUTS


def word_scale_bar(own_scale: bool):
    """The word overlays' colour bar for the chosen scale."""
    peak = "each word's own peak" if own_scale else "the strongest word's peak at this step"
    return charts.colour_bar(f"how much of a spot's attention goes to the word, relative to {peak}")


def run_settings(model_id, prompt, negative, seed, steps, guidance, width, height, schedule, concentration, custom) -> RunSettings:
    """A run's settings from the tab's controls, checked (ValueError names what is wrong)."""
    chosen = parse_timestep_list(custom) if schedule == "custom" else schedule
    return RunSettings(
        prompt=prompt or "", negative_prompt=negative or "", seed=int(seed), steps=int(steps), guidance=float(guidance),
        width=int(width), height=int(height), schedule=chosen, concentration=float(concentration), per_group=True,
        vae_decode_every=config.run_decode_every(config.model_spec(model_id), gpu.on_gpu()),
    ).validated()


def stream(model_id: str, runs: list[RunSettings], endpoint: str, runner=None):
    """Yield (runs, step, waiting) after every step done by all runs: the list of RunData, filled as
    records arrive, the step, and how many newer steps are already done (the page is behind).
    ``runner``: as ``collect``'s."""
    try:
        spec = config.model_spec(model_id)
        model = load_model(spec.id)  # fails here, with a message, for a model that cannot load
        for one in runs:  # e.g. words outside the embedded model's vocabulary
            model.check_prompt(one.prompt)
    except ValueError as error:
        raise refusal(endpoint, error) from error
    # The run goes ahead in a thread: rendering and sending an update never holds it back.
    for (data, step), waiting in run_ahead(collect(spec.id, runs, runner)):
        yield data, step, waiting


def collect(model_id: str, runs: list[RunSettings], runner=None):
    """Yield (runs, step) each time every run has finished ``step``; the runs fill in place.
    ``runner`` does the work (default: ``gpu.run_on_device``)."""
    data: list[RunData] = []
    for kind, index, item in (runner or gpu.run_on_device)(model_id, [s.to_dict() for s in runs]):
        if kind == "start":
            data.append(item)
        elif kind == "step":
            data[index].records.append(item)
            if index == len(data) - 1:  # every run has finished this step
                yield data, item.index
        else:  # the finished run: its final image, reproduction record and the layer groups its steps filled
            data[index].final_array, data[index].final_image = item.final_array, item.final_image
            data[index].reproduction = item.reproduction  # in place: the session holds these objects
            data[index].attention_groups = item.attention_groups
            data[index].source = item.source  # an image run's, with its reconstruction error


def up_to(runs: list[RunData], step: int) -> list[RunData]:
    """The runs as they were at ``step``: the run thread may already be appending later records."""
    return [dataclasses.replace(run, records=run.records[:step]) for run in runs]


def step_view(runs: list[RunData], step: int, streaming: bool = False, since: int | None = None,
              numbers_only: bool = False, pictures_since: int | None = None, own_scale: bool = False):
    """What the Denoise tab shows at one step (1-based) of the current runs. The JSON's "steps"
    lists the facts of every step from ``since`` (default: this one) to this one: while streaming,
    steps that a newer one overtook before the page was ready go out with it. ``numbers_only``
    leaves the pictures and charts as they are (a light update: status line and JSON);
    ``pictures_since`` is the first step after the last update that had pictures (default: ``since``);
    ``own_scale`` draws each word's overlay on its own scale instead of one shared by all words."""
    first = runs[0]
    record = first.records[min(step, len(first.records)) - 1]
    status = f"**{record.label}** · noise level σ = {record.sigma:.3g}"
    messages = [m for run in runs for m in run.messages]
    if messages:
        status += "  \n⚠️ " + " ".join(messages)
    covered = slice((since or record.index) - 1, record.index)
    data = views.step_summary(first, record) | {"words": first.tokens.word_texts, "messages": messages}
    data["steps"] = [views.step_summary(first, r) for r in first.records[covered]]
    if len(runs) > 1:
        second = runs[1]
        data["second_prompt"] = views.step_summary(second, second.records[record.index - 1])
        data["second_prompt"]["steps"] = [views.step_summary(second, r) for r in second.records[covered]]
    if numbers_only:
        return (*[gr.skip()] * 4, status, gr.skip(), gr.skip(), gr.skip(), data)
    views_shown = []
    for which in (0, 1):
        if which < len(runs):
            other = runs[which].records[record.index - 1]
            views_shown += [pictures.for_display(pictures.step_picture(other, "prediction")),
                            pictures.for_display(pictures.step_picture(other, "noisy"))]
        else:
            views_shown += [None, None]
    chart = charts.noise_level_chart(tuple(first.timesteps), tuple(first.noise_levels)).at(record.index)
    total = len(first.timesteps)
    if streaming and record.index == 1:  # one point says nothing yet; the first update comes sooner
        concepts = gr.skip()
    elif streaming:  # painted on a chart drawn once per run shape: a matplotlib redraw costs ~200 ms
        series = views.concept_series(first)
        concepts = charts.streaming_concept_chart(total, tuple(series), CONCEPT_CHART_TITLE, views.SCORE_AXES["peak"]).draw(series)
    else:
        concepts = charts.concept_chart(list(range(1, total + 1)), views.concept_series(first), CONCEPT_CHART_TITLE,
                                        views.SCORE_AXES["peak"])
    period = max(1, total // 5)
    unpictured = range(pictures_since or covered.start + 1, record.index + 1)
    if streaming and record.index != total and not any(i % period == 0 for i in unpictured):
        # one picture per word: while streaming they follow every fifth of the run (and the last step)
        overlays = gr.skip()
    else:
        overlays = views.word_overlays(first, record, max_side=settings.APP.overlay_gallery_side, shared_scale=not own_scale)
    return (*views_shown, status, chart, overlays, concepts, data)


def denoise(model_id, prompt, prompt_b, negative, seed, steps, guidance, width, height, schedule, concentration, custom, session,
            own_scale=False):
    """Run a text-to-image diffusion model and stream its steps: what it thinks the finished picture
    is, the noisy picture it holds, and where each word of the prompt is looked at. A second prompt
    runs from the same noise. The run is kept: pass the run_id in the returned data to the other tools.

    Args:
        model_id: The model: "embedded/shapes-ldm" (small, runs on a CPU) or a Stable Diffusion id from the page's list.
        prompt: What to draw.
        prompt_b: A second prompt, run from the same starting noise for comparison ("" for none).
        negative: What to steer away from ("" for nothing).
        seed: The starting noise's seed (-1 for a random one; the seed used is in the data).
        steps: How many denoising steps to take.
        guidance: How strictly the model follows the prompt (classifier-free guidance scale).
        width: The picture's width in pixels (a multiple of 8).
        height: The picture's height in pixels (a multiple of 8).
        schedule: The time-step schedule: "uniform", "early" (dense at high noise), "latter" (dense at low noise) or "custom".
        concentration: How strongly the early and latter schedules crowd their steps (λ, 0 or more).
        custom: The timesteps of a "custom" schedule, strictly decreasing with commas between, e.g. "999, 500, 50".
        session: The caller's session, kept by the app (not an API argument).
        own_scale: Whether each word's overlay has its own colour scale (the page's toggle; not an API argument).

    Returns:
        for each prompt the predicted and the noisy picture (the second prompt's None without one)
        a status line, the noise-level chart, one attention overlay per word and the concept chart
        the step's data as JSON ("steps": every step since the last update; "run_id": the run's id)
    """
    try:
        first = run_settings(model_id, prompt, negative, seed, steps, guidance, width, height, schedule, concentration, custom)
        runs = [first] + ([RunSettings.from_dict(first.to_dict() | {"prompt": prompt_b})] if (prompt_b or "").strip() else [])
        runs = [one.validated() for one in runs]
    except ValueError as error:
        raise refusal("/denoise", error) from error
    session = session or Session()
    run_id = None
    last_sent = last_pictured = 0
    budget = UpdateBudget(None if gpu.on_gpu() else settings.APP.cpu_stream_share, settings.APP.max_update_gap_s)
    for now, step, waiting in stream(model_id, runs, "/denoise"):
        if run_id is None:
            session.add(now)
            run_id = RUNS.add(now)  # for callers without this session, e.g. over MCP
        if waiting:
            continue  # a newer step is done: this one's facts go out with it
        with_pictures = step == len(now[0].timesteps) or budget.allows()
        if not (with_pictures or budget.due()):
            continue  # drawing would slow a CPU run, and the page had news a moment ago
        with budget.spending():
            if with_pictures and not gpu.on_gpu():  # a CPU run decodes its last step only: the shown steps here
                gpu.decode(model_id, [run.records[step - 1] for run in now])
            *view, data = step_view(up_to(now, step), step, streaming=True, since=last_sent + 1,
                                    numbers_only=not with_pictures, pictures_since=last_pictured + 1, own_scale=own_scale)
            yield *view, data | {"run_id": run_id}, session
        last_sent = step
        last_pictured = step if with_pictures else last_pictured


def after_run(session: Session | None, gif=None) -> AfterRun:
    """Open the scrubber and fill the other tabs' choices from the finished run (its animation:
    ``gif``, or made now in the session's folder)."""
    run = session.run(0)
    words = views.token_labels(run)
    steps = len(run.records)
    groups = list(views.layer_groups(run))
    if gif is None:
        gpu.decode(run.model_id, run.records)  # every frame of the animation
        gif = export.animation(run, session.file(f"{export.file_stem(run)}.gif"))
    return AfterRun(
        scrubber=gr.update(maximum=steps, value=steps, interactive=True),
        word=gr.update(choices=words, value=words[min(len(words) - 1, 1)] if words else None),
        step=gr.update(maximum=steps, value=steps),
        start=gr.update(maximum=steps, value=1),
        end=gr.update(maximum=steps, value=steps),
        groups=gr.update(choices=groups, value=groups),
        animation=str(gif),
        paths=charts.trajectory_chart(*_paths(session.latest()), "The path from noise to picture"),
        explained_step=gr.update(maximum=steps, value=settings.explained_step(steps)),
    )


def _paths(runs: list[RunData]):
    """The runs' latent paths by label, and their axes' variance shares (``views.latent_paths``)."""
    paths, variance = views.latent_paths(runs)
    labels = ["first prompt", "second prompt"] if len(runs) > 1 else ["this run"]
    return dict(zip(labels, paths)), variance


def denoise_on_page(*inputs):
    """The Run button: ``denoise``'s updates (its inputs, then the word-scale toggle), the second
    prompt's panels shown only when there is one, then the finished run opens the scrubber and fills
    the other tabs' choices (``after_run``'s outputs, which ``denoise``'s updates leave as they are).
    The last concept chart goes out again with them: Gradio's page keeps a streamed update only for
    the tabs opened so far, and the chart is on another tab."""
    prompt_b = inputs[2]
    second = gr.update(visible=bool((prompt_b or "").strip()))
    update, concepts = (), gr.skip()
    for update in denoise(*inputs):  # the step view, then the session
        yield *update[:-1], update[DATA]["run_id"], update[-1], second, *[gr.skip()] * AFTER_RUN_OUTPUTS
        second = gr.skip()
        concepts = concepts if isinstance(update[CONCEPTS], dict) else update[CONCEPTS]  # a dict: skipped
    last = [gr.skip()] * (len(update) + 1)  # the step view, the run id box, the session
    if update:
        last[CONCEPTS] = concepts
    yield *last, gr.skip(), *after_run(update[-1]).values()


def show_step(session: Session | None, step: int, own_scale: bool = False):
    """Scrub back to a recorded step without recomputing."""
    try:
        runs = current(session)
        check_step(runs[0], step)
    except ValueError as error:
        raise refusal("scrub", error) from error
    gpu.decode(runs[0].model_id, [run.records[int(step) - 1] for run in runs])  # a step the run did not decode
    return step_view(runs, int(step), own_scale=own_scale)


def rescale_words(session: Session | None, step: int, own_scale: bool):
    """The toggle between one scale for all words and each word's own: the shown step's overlays
    redrawn (nothing before a run) and the colour bar that goes with them."""
    runs = session.latest() if session is not None and session.groups else None
    if not runs or not 1 <= int(step) <= len(runs[0].records):
        return gr.skip(), word_scale_bar(own_scale)
    record = runs[0].records[int(step) - 1]
    gpu.decode(runs[0].model_id, [record])
    overlays = views.word_overlays(runs[0], record, max_side=settings.APP.overlay_gallery_side, shared_scale=not own_scale)
    return overlays, word_scale_bar(own_scale)


def on_model_change(model_id):
    """The chosen model's defaults and examples; the status line says at once if it cannot run here."""
    spec = config.model_spec(model_id)
    try:
        check_loadable(spec)
        status = gr.skip()
    except ValueError as error:
        status = f"⚠️ {error}"
    return spec.width, spec.height, spec.steps, spec.guidance, gr.update(samples=[[p] for p in spec.examples]), status


def build() -> DenoiseTab:
    """The Denoise tab in the current Blocks context, with its own events (``wire_run`` adds the run's)."""
    tab = DenoiseTab()
    tab.model_id.change(on_model_change, tab.model_id, [tab.width, tab.height, tab.steps, tab.guidance, tab.examples, tab.status],
                        api_visibility="private")
    tab.examples.click(lambda sample: sample[0], tab.examples, tab.prompt, api_visibility="private")
    return tab


def filled_by_run(tab: DenoiseTab, attention, saliency) -> AfterRun:
    """The components a finished run fills (``after_run``'s updates go to them)."""
    return AfterRun(scrubber=tab.slider, word=attention.word, step=attention.step, start=attention.start, end=attention.end,
                    groups=attention.groups, animation=tab.animation, paths=tab.paths, explained_step=saliency.step)


def wire_run(tab: DenoiseTab, session: gr.State, concepts, attention, saliency) -> list:
    """The Run button (page and ``/denoise``) and the scrubber, once the tabs they fill are built:
    the step view draws the Concepts tab's ``chart``; a finished run fills Attention's ``word``,
    ``step``, ``start``, ``end`` and ``groups`` and Saliency's ``step`` (``AfterRun``). Returns the Run
    button's outputs on the page (``PAGE_OUTPUTS`` of them), which the example fills too."""
    outputs = tab.step_outputs(concepts.chart)
    filled = filled_by_run(tab, attention, saliency)
    page_outputs = outputs + [tab.run_id, session, tab.second] + filled.values()
    serve_both(tab.run, denoise, tab.run_inputs() + [session], outputs + [session], "denoise", notice=tab.status,
               page_handler=denoise_on_page, page_inputs=tab.run_inputs() + [session, tab.own_scale],
               page_outputs=page_outputs, **gpu.queue())
    # typing a step in the slider's box and dragging both fire "input"; only the latest pending one runs
    tab.slider.input(on_page(show_step, len(outputs), notice=STATUS), [session, tab.slider, tab.own_scale], outputs,
                     api_visibility="private", trigger_mode="always_last")
    tab.own_scale.change(rescale_words, [session, tab.slider, tab.own_scale], [tab.overlays, tab.scale_bar],
                         api_visibility="private")
    assert len(page_outputs) == PAGE_OUTPUTS
    return page_outputs

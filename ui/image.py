"""The Image tab: explain a picture the model did not make (an upload, or a scene rendered by the shapes
world). The picture is noised at every step or inverted (``explainer.image_mode``) and the run streams
as a generation does; the finished run becomes the session's latest, so every other tab explains it.
Concept maps at a chosen step: ConceptAttention on a joint-attention model, the concept words' own
cross-attention maps on a UNet."""

from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from explainer import config
from explainer.image_mode import MODES, read_image
from explainer.methods.concept_attention import FAMILIES as CONCEPT_FAMILIES
from explainer.render import pictures, views
from explainer.run import RunData, RunSettings
from explainer.shapes.world import generate_scene

from . import denoise, gpu, settings
from .page import DEFAULT_MODEL, DEFAULT_SPEC, intro, model_choices, notice_line, on_page, refusal, serve_both, step_slider
from .session import RUNS, Session, check_step, current
from .streaming import UpdateBudget

LIMITS = config.LIMITS
MODE_LABELS = {"noise": "noise: the picture noised to every step's level", "invert": "invert: back to noise, then denoised"}


class ImageTab:
    """The Image tab's components, by name."""

    def __init__(self):
        intro("Give a picture the model did not make, and see what the model recovers of it at every noise level and "
              "where it finds each word or concept. Upload one, or render a scene of the shapes world.", "Image")
        with gr.Row():
            with gr.Column(scale=1):
                self.picture = gr.Image(label="Picture to explain", type="pil", image_mode=None, height=260,
                                        sources=["upload", "clipboard"])
                with gr.Row(equal_height=True):
                    self.scene_seed = gr.Number(label="Scene seed", value=7, precision=0, scale=1)
                    self.render = gr.Button("Render a shapes scene", scale=2)
                self.model_id = gr.Dropdown(choices=model_choices(gpu.on_gpu()), value=DEFAULT_MODEL, label="Model")
                self.prompt = gr.Textbox("", label="Prompt (optional: the concepts, when empty)", max_lines=2)
                self.concepts = gr.Textbox(", ".join(DEFAULT_SPEC.concepts), label="Concepts (words with commas between)")
                self.mode = gr.Radio([(label, mode) for mode, label in MODE_LABELS.items()], value=config.DEFAULTS.image_mode,
                                     label="Trajectory")
                with gr.Row():
                    self.steps = gr.Slider(1, LIMITS.max_steps, value=DEFAULT_SPEC.steps, step=1, label="Steps")
                    self.guidance = gr.Slider(0, LIMITS.max_guidance, value=config.DEFAULTS.image_guidance, step=0.5,
                                              label="Guidance", info="1: the prompt's prediction alone (inverts best)")
                self.seed = gr.Number(label="Seed of the noise (noise trajectory)", value=config.DEFAULTS.seed, precision=0)
                self.run = gr.Button("Explain this picture", variant="primary")
                self.notice = notice_line()
            with gr.Column(scale=2):
                self.status = gr.Markdown("Give a picture and press **Explain this picture**.")
                with gr.Row():
                    self.source = gr.Image(label="The picture, as the model gets it", type="pil", format="png", height=240,
                                           interactive=False)
                    self.pred = gr.Image(label="What the model recovers of it at this step", type="pil", format="png",
                                         height=240)
                    self.noisy = gr.Image(label="What it holds at this step", type="pil", format="png", height=240)
                self.slider = step_slider(1, "Step (after the run)", interactive=False)
                # fit_columns=False: a gallery of one or two maps keeps quarter-width cells, not the whole row
                self.overlays = gr.Gallery(label="Where each word of the prompt is looked at, at this step", columns=4,
                                           format="jpeg", height="auto", object_fit="contain", fit_columns=False)
                self.concept_maps = gr.Gallery(label="Where each concept is found, at this step", columns=4, format="jpeg",
                                               height=240, object_fit="contain", fit_columns=False)  # a row of four
                with gr.Accordion("Data", open=False):
                    self.data = gr.JSON(label="This step's numbers")
                    self.run_id = gr.Textbox(label="Run id", interactive=False, buttons=["copy"],
                                             info="Names this run for the API and MCP tools (their run_id argument).")
        # the endpoint's picture: a file, read by the handler, so that what is not a picture gets its message
        self.picture_file = gr.File(visible=False, label="Picture file (PNG, JPEG, WebP, GIF or BMP)")

    def settings_inputs(self) -> list:
        return [self.model_id, self.prompt, self.concepts, self.mode, self.steps, self.guidance, self.seed]

    def step_outputs(self) -> list:
        return [self.source, self.pred, self.noisy, self.status, self.overlays, self.concept_maps, self.data]


def concept_words(concepts) -> tuple[str, ...]:
    return tuple(word.strip() for word in (concepts or "").split(",") if word.strip())


def image_settings(model_id, prompt, concepts, steps, guidance, seed) -> RunSettings:
    """An image run's settings: the model's size, the prompt (the concepts when it is empty)."""
    spec = config.model_spec(model_id)
    words = concept_words(concepts)
    prompt = (prompt or "").strip() or ", ".join(words)
    if not prompt:
        raise ValueError("Give a prompt or some concepts: the model needs words to look for.")
    return RunSettings(prompt=prompt, seed=int(seed), steps=int(steps), guidance=float(guidance), width=spec.width,
                       height=spec.height, scheduler="ddim", per_group=True).validated()


def explain_image(model_id, picture, prompt, concepts, mode, steps, guidance, seed, session):
    """Explain a picture the model did not make: at every step what the model recovers of it and where it
    finds each word of the prompt and each concept. The run is kept: pass the run_id in the returned data
    to the other tools (attention, saliency, relevance, export), which explain it as they explain a generation.

    Args:
        model_id: The model: "embedded/shapes-ldm" (small, runs on a CPU) or another id from the page's list.
        picture: The picture, a PNG, JPEG, WebP, GIF or BMP file; resized to the model's size with a message.
        prompt: Words describing the picture ("" to use the concepts as the prompt).
        concepts: Concepts to find, as words with commas between, e.g. "circle, square". On a model with joint
            attention (Stable Diffusion 3, FLUX.1) they need not be in the prompt; on a UNet they must be.
        mode: "noise" (the picture noised to every step's level, one noise for all) or "invert" (the picture
            inverted to noise, then denoised by the model: it returns close to the picture).
        steps: How many steps.
        guidance: Classifier-free guidance scale (1: the prompt's prediction alone, which inverts best).
        seed: The seed of the noise of the "noise" trajectory.
        session: The caller's session, kept by the app (not an API argument).

    Returns:
        the picture as the model gets it, what the model recovers of it and what it holds at the step
        a status line, one attention overlay per word, one map per concept
        the step's data as JSON ("run_id": the run's id; "reconstruction_error" after an inverted run)
    """
    try:
        run_settings = image_settings(model_id, prompt, concepts, steps, guidance, seed)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        source, messages = read_image(picture, run_settings.width, run_settings.height)
    except ValueError as error:
        raise refusal("/explain_image", error) from error
    session = session or Session()
    run_id = None
    budget = UpdateBudget(None if gpu.on_gpu() else settings.APP.cpu_stream_share, settings.APP.max_update_gap_s)

    def runner(model_id, settings_dicts):
        return gpu.image_run_on_device(model_id, settings_dicts[0], source, mode)

    runs = []
    for runs, step, waiting in denoise.stream(model_id, [run_settings], "/explain_image", runner=runner):
        if run_id is None:
            runs[0].messages.extend(messages)
            session.add(runs)
            run_id = RUNS.add(runs)
        if waiting or step == len(runs[0].timesteps) or not budget.allows():
            continue  # the last step is shown once the run is done: an inverted run's error is known then
        with budget.spending():
            *view, data = step_view(runs[0], step, concepts, with_concepts=False)
            yield *view, data | {"run_id": run_id}, session
    if runs:
        *view, data = step_view(runs[0], len(runs[0].records), concepts)
        yield *view, data | {"run_id": run_id}, session


def step_view(run: RunData, step: int, concepts, with_concepts: bool = True) -> tuple:
    """What the Image tab shows at one step: the picture, the prediction and the noisy latent, a status
    line, the word overlays, the concept maps (``with_concepts``) and the step's data."""
    gpu.decode(run.model_id, [run.records[step - 1]])
    record = run.records[step - 1]
    status = f"**{record.label}** · noise level σ = {record.sigma:.3g} · trajectory: {run.source.get('mode', '?')}"
    if "reconstruction_error" in run.source:
        status += f" · regenerated picture off by {run.source['reconstruction_error']:.3f} on average (pixels in [0, 1])"
    if run.messages:
        status += "  \n⚠️ " + " ".join(run.messages)
    overlays = views.word_overlays(run, record, max_side=settings.APP.overlay_gallery_side, shared_scale=True)
    found, notes = concept_maps(run, step, concept_words(concepts)) if with_concepts else (gr.skip(), [])
    if notes:
        status += "  \n" + " ".join(notes)
    data = views.step_summary(run, record) | {"words": run.tokens.word_texts, "messages": run.messages, "source": run.source}
    return (pictures.for_display(run.source_image, 240), pictures.for_display(pictures.step_picture(record, "prediction"), 240),
            pictures.for_display(pictures.step_picture(record, "noisy"), 240), status, overlays, found, data)


def concept_maps(run: RunData, step: int, concepts: tuple[str, ...]) -> tuple[list, list[str]]:
    """Each concept's map over the picture at ``step``, and notes for concepts without one: ConceptAttention's
    output-space maps where the family has joint attention (open vocabulary); on a UNet the concept's own
    cross-attention map, for concepts that are words of the prompt (docs/methods.md says why no more)."""
    if not concepts:
        return [], []
    picture = pictures.for_display(run.source_image, 240)
    family = config.model_spec(run.model_id).family
    if family in CONCEPT_FAMILIES:
        found = gpu.concept_maps_on_device(run.model_id, run.for_computing(), step, concepts, "all")
        return [(pictures.overlay(picture, values, scale=1.0), f"{key.split(':', 1)[1]} · {found.token_scores[key]:.0%}")
                for key, values in found.token_maps.items()], []
    record, shown, missing = run.records[step - 1], [], []
    for concept in concepts:
        try:
            index = run.tokens.find(concept)
        except ValueError:  # not a word of the prompt
            missing.append(concept)
            continue
        shown.append((pictures.overlay(picture, views.word_map(run, index, [record], False)), concept))
    notes = [f"Not in the prompt, so no map on this UNet model: {', '.join(missing)} (open-vocabulary concepts need a "
             "model with joint attention)."] if missing else []
    return shown, notes


def show_step(session: Session | None, step: int, concepts):
    """Scrub the image run to a recorded step (concept maps recomputed there)."""
    try:
        run = current(session)[0]
        check_step(run, step)
        if not run.source:
            raise ValueError("The latest run is a generation, not a picture: explain a picture first.")
    except ValueError as error:
        raise refusal("scrub", error) from error
    return step_view(run, int(step), concepts)


def rendered_scene(seed) -> tuple[Image.Image, str]:
    """A scene of the shapes world, rendered (never generated), for the picture input, and its caption
    for the prompt."""
    try:
        scene = generate_scene(int(seed), split="any")
    except (TypeError, ValueError) as error:
        raise refusal("render", f"The scene seed must be a whole number, got {seed!r}.") from error
    return Image.fromarray(np.asarray(scene.image)), scene.caption


def explain_on_page(*inputs):
    """The page's button: ``explain_image``'s updates, the run id, then the finished run opens this tab's
    scrubber and fills the other tabs' choices as a generation does (``denoise.after_run``)."""
    update = None
    for update in explain_image(*inputs):
        yield *update[:-1], update[-2]["run_id"], update[-1], gr.skip(), *[gr.skip()] * denoise.AFTER_RUN_OUTPUTS
    if update is not None:
        steps = len(update[-1].run(0).records)
        yield (*[gr.skip()] * (len(update) + 1), gr.update(maximum=steps, value=steps, interactive=True),
               *denoise.after_run(update[-1]).values())


def build_tab() -> ImageTab:
    """The Image tab in the current Blocks context, with its own events (``wire_run`` adds the run's)."""
    tab = ImageTab()
    tab.render.click(rendered_scene, tab.scene_seed, [tab.picture, tab.prompt], api_visibility="private")
    tab.model_id.change(lambda chosen: ", ".join(config.model_spec(chosen).concepts), tab.model_id, tab.concepts,
                        api_visibility="private")
    return tab


def wire_run(tab: ImageTab, session: gr.State, filled: denoise.AfterRun) -> None:
    """The explain button (page and ``/explain_image``) and the scrubber, once the tabs a finished run
    fills (``filled``) exist."""
    outputs = tab.step_outputs()
    settings_inputs = [tab.prompt, tab.concepts, tab.mode, tab.steps, tab.guidance, tab.seed, session]
    serve_both(tab.run, explain_image, [tab.model_id, tab.picture_file, *settings_inputs], outputs + [session],
               "explain_image", notice=tab.notice, page_handler=explain_on_page,
               page_inputs=[tab.model_id, tab.picture, *settings_inputs],
               page_outputs=outputs + [tab.run_id, session, tab.slider] + filled.values(), **gpu.queue())
    tab.slider.input(on_page(show_step, len(outputs), notice=3), [session, tab.slider, tab.concepts], outputs,
                     api_visibility="private", trigger_mode="always_last")

"""The app's tabs: components only (no handlers, no computing). ``app.py`` wires them."""

from __future__ import annotations

import gradio as gr

from explainer import config, plots
from explainer.methods import DFCam, TokenRelevance
from explainer.models import preferred_device
from ui.settings import APP, explained_step
from explainer.methods.base import RECTIFIERS
from explainer.methods.cam import LAYER_SCALES as CAM_LAYER_SCALES
from explainer.methods.cam import TARGETS as CAM_TARGETS
from explainer.methods.cam import WEIGHTINGS as CAM_WEIGHTINGS
from explainer.methods.rise import ESTIMATORS as RISE_ESTIMATORS

LIMITS = config.LIMITS
DEFAULT_MODEL = config.default_model_id()
DEFAULT_SPEC = config.MODELS[DEFAULT_MODEL]
AGGREGATIONS = ["this step", "range of steps", "all steps"]
RELEVANCE_RECTIFY_INFO = ("abs (default): gradient × attention counts whichever way it pushes the output; relu: the "
                          "paper's positive part, which misses what the model draws by pushing the output down")
CAM_TARGET_INFO = ("guidance (default): how much the prompt changes the prediction, ½‖ε_c − ε_u‖²; sum: the paper's "
                   "sum of the output, which has no preferred sign (ReLU then drops shapes drawn by pushing it down)")
CAM_WEIGHTING_INFO = ("layercam (default): each pixel by its gradient's positive part; hirescam: by its gradient; grad-cam "
                      "(the paper's): each channel by its mean gradient over the image, which a small shape barely moves")
CAM_LAYER_SCALE_INFO = ("target (default): each layer counts by how much of the explained quantity it carries; min-max "
                        "(the paper's): every layer's map scaled to [0, 1] first, so a layer that sees nothing weighs as much")
CAM_RECTIFY_INFO = ("relu (default, the paper's): where the layer pushes the explained quantity up; abs: either way "
                    "(with grad-cam weights its maps stay much the same on a model with random weights: they partly show the input)")
class StepSlider(gr.Slider):
    """A slider for a step of the latest run. On the page its maximum follows the run; a request is
    checked against the run's own step count by the handler, not against the maximum the slider had
    when the page was built (an API client never sees the page's updates)."""

    is_template = True  # drawn as a gr.Slider

    def preprocess(self, payload: float) -> float:
        gr.Number.raise_if_out_of_bounds(payload, self.minimum, None)
        return gr.Number.round_to_precision(payload, self.precision)


def model_choices(on_gpu: bool) -> list[tuple[str, str]]:
    """The model dropdown's (label, id) pairs; on a machine without a GPU the models that need one say so."""
    return [(spec.label + (" — needs a GPU, none here" if spec.needs_gpu and not on_gpu else ""), spec.id)
            for spec in config.MODELS.values()]


def notice_line():
    """The line under a tab's button that says what was refused (empty while all is well)."""
    return gr.Markdown("", elem_classes="notice")


SALIENCY_METHODS = {"DF-RISE": "df-rise", "DF-CAM": "df-cam", "DF-LIME": "df-lime", "random baseline": "random", "centred baseline": "centre"}


# Streamed pictures are PNG: encoding them costs a third of WebP's on a CPU (measured: 65 pictures
# of one run, 0.18 s against 0.55 s), and they are small.
def denoise_tab():
    with gr.Row():
        with gr.Column(scale=1):
            c = {}
            c["prompt"] = gr.Textbox(label="Prompt", value=DEFAULT_SPEC.examples[0], max_lines=3)
            c["prompt_b"] = gr.Textbox(label="Second prompt (optional): compared from the same starting noise", max_lines=2)
            c["model_id"] = gr.Dropdown(choices=model_choices(preferred_device()[0].type == "cuda"), value=DEFAULT_MODEL, label="Model")
            with gr.Row():
                c["seed"] = gr.Number(label="Seed (-1: random)", value=config.DEFAULTS.seed, precision=0)
                c["steps"] = gr.Slider(1, LIMITS.max_steps, value=DEFAULT_SPEC.steps, step=1, label="Steps")
            c["guidance"] = gr.Slider(0, LIMITS.max_guidance, value=DEFAULT_SPEC.guidance, step=0.5, label="Guidance")
            c["schedule"] = gr.Radio(
                ["uniform", "early", "latter", "custom"], value=config.DEFAULTS.schedule, label="Time-step schedule",
                info="early: dense where noise is high; latter: dense where it is low",
            )
            with gr.Accordion("More settings", open=False):
                c["negative"] = gr.Textbox(label="Negative prompt", value="")
                with gr.Row():
                    c["width"] = gr.Slider(LIMITS.min_side, LIMITS.max_side, value=DEFAULT_SPEC.width, step=LIMITS.side_multiple, label="Width")
                    c["height"] = gr.Slider(LIMITS.min_side, LIMITS.max_side, value=DEFAULT_SPEC.height, step=LIMITS.side_multiple, label="Height")
                c["lam"] = gr.Slider(0, APP.lam_slider_max, value=config.DEFAULTS.lam, step=1, label="λ (schedule concentration)")
                c["custom"] = gr.Textbox(label="Custom timesteps (schedule = custom)", placeholder="999, 800, 600, 400, 200, 50")
                gr.Markdown(f"Limits: up to {LIMITS.max_steps} steps, sides {LIMITS.min_side}–{LIMITS.max_side} px in multiples of {LIMITS.side_multiple}.")
            c["run"] = gr.Button("Run", variant="primary")
            c["examples"] = gr.Dataset(components=[c["prompt"]], samples=[[p] for p in DEFAULT_SPEC.examples], label="Examples")
        with gr.Column(scale=2):
            c["status"] = gr.Markdown("Press **Run** to start.")
            with gr.Row():
                c["pred_a"] = gr.Image(label="Prediction view: the clean image the model predicts now", type="pil", format="png", height=300)
                c["noisy_a"] = gr.Image(label="Noisy view: the current latent x_t, decoded", type="pil", format="png", height=300)
            with gr.Row():
                c["pred_b"] = gr.Image(label="Second prompt: prediction view", type="pil", format="png", height=200)
                c["noisy_b"] = gr.Image(label="Second prompt: noisy view", type="pil", format="png", height=200)
            c["slider"] = StepSlider(1, DEFAULT_SPEC.steps, value=1, step=1, label="Step (scrub after the run)", interactive=False)
            with gr.Row():
                c["chart"] = gr.Image(label="Noise level", show_label=False, type="pil", format="png", height=220)
                c["data"] = gr.JSON(label="This step's data")
            # JPEG: a heat-map overlay is smooth colour, which PNG encodes slowly (~9 ms against 0.1 ms for
            # a 128 px overlay, one per word at every streamed overlay update) and 5-8x larger
            c["overlays"] = gr.Gallery(label="Cross-attention per word at this step (first prompt)", columns=6, format="jpeg", height=220)
            c["animation"] = gr.File(label="Animation of the run (GIF)")
    return c


def attention_tab():
    c = {}
    with gr.Row():
        with gr.Column(scale=1):
            c["word"] = gr.Dropdown(label="Word", choices=[], allow_custom_value=True)
            c["include_special"] = gr.Checkbox(label="Show start / end / padding tokens", value=False)
            gr.Markdown(
                "*The start token soaks up most attention everywhere (a 'sink'); the end and padding tokens "
                "carry a summary of the whole prompt. They are hidden by default.*"
            )
            c["aggregation"] = gr.Radio(AGGREGATIONS, value="this step", label="Aggregate")
            c["step"] = StepSlider(1, DEFAULT_SPEC.steps, value=DEFAULT_SPEC.steps, step=1, label="Step")
            with gr.Row():
                c["start"] = StepSlider(1, DEFAULT_SPEC.steps, value=1, step=1, label="Range start")
                c["end"] = StepSlider(1, DEFAULT_SPEC.steps, value=DEFAULT_SPEC.steps, step=1, label="Range end")
            # a dropdown, not checkboxes: its choices come from the run, and an API client (which
            # never sees them filled) may still name a group; the handler checks the name
            c["groups"] = gr.Dropdown(label="Layers (block and resolution; empty = all)", choices=[], value=[],
                                      multiselect=True, allow_custom_value=True)
            c["view"] = gr.Radio(["prediction", "noisy"], value="prediction", label="Picture under the map")
            c["opacity"] = gr.Slider(0, 1, value=0.8, step=0.05, label="Overlay opacity")
            c["which"] = gr.Radio(["first prompt", "second prompt"], value="first prompt", label="Prompt")
            c["show"] = gr.Button("Show", variant="primary")
            c["notice"] = notice_line()
        with gr.Column(scale=2):
            c["overlay"] = gr.Image(label="Attention overlay", type="pil", height=360)
            gr.Image(value=plots.colour_scale(), label="Colour scale: blue = least, red = most of this map (min-max)", height=60, interactive=False)
            with gr.Row():
                c["npy"] = gr.File(label="Raw map (.npy, latent grid)")
                c["summary"] = gr.JSON(label="Map data")
    return c


def concepts_tab():
    c = {}
    gr.Markdown(
        "**Which concept is drawn at each step?** The *cheap score* is each word's share of the cross-attention "
        "at that step; *token relevance* is the paper's measure, attention weighted by its gradient and carried "
        "through every layer (Chefer et al.), by default in either direction (|gradient × attention|; *relu* is the "
        "paper's positive part). Both are min-max normalised across the words at each step; "
        "the chart's title says which one is shown."
    )
    with gr.Row():
        c["refresh"] = gr.Button("Cheap score (recorded attention)")
        c["relevance"] = gr.Button("Token relevance (gradient, one pass per step)")
        c["rectify"] = gr.Radio(list(RECTIFIERS), value=TokenRelevance.rectify, label="Relevance: gradient × attention kept as",
                                info=RELEVANCE_RECTIFY_INFO)
    c["notice"] = notice_line()
    with gr.Row():
        c["chart"] = gr.Image(label="Concept chart", type="pil", format="png", height=300)
        c["bars"] = gr.Image(label="Summed over steps", type="pil", height=300)
    c["data"] = gr.JSON(label="Scores per step", max_height=240)  # the chart shows it; the JSON is for copying
    gr.Markdown("### Compare schedules\nThe Denoise tab's prompt and seed under the three schedules (λ from its settings).")
    c["compare"] = gr.Button("Compare uniform / early / latter", variant="primary")
    c["compare_notice"] = notice_line()
    c["grid"] = []
    with gr.Row():
        for kind in config.SCHEDULE_KINDS:
            with gr.Column():
                c["grid"] += [
                    gr.Image(label=f"{kind}: image", type="pil", height=200),
                    # the charts carry their own titles, which a label would cover at this height
                    gr.Image(label=f"{kind}: concept chart", show_label=False, type="pil", height=200),
                    gr.Image(label=f"{kind}: totals", show_label=False, type="pil", height=200),
                ]
    c["compare_data"] = gr.JSON(label="Scores per schedule", max_height=240)
    return c


def saliency_tab():
    c = {}
    gr.Markdown(
        "**Where does the model recover the image at this step?** Pick a method and a step of the latest run. "
        "DF-RISE masks the noisy latent many times and sees which pixels the step's result depends on; DF-CAM "
        "weighs every layer's activations by their gradients; the baselines (random, centred) are what a "
        "method must beat. Insertion and deletion score the map by how fast revealing (removing) its top "
        "pixels brings back (destroys) the real next step."
    )
    with gr.Row():
        with gr.Column(scale=1):
            c["method"] = gr.Dropdown(list(SALIENCY_METHODS), value="DF-RISE", label="Method")
            c["step"] = StepSlider(1, DEFAULT_SPEC.steps, value=explained_step(DEFAULT_SPEC.steps), step=1, label="Step")
            with gr.Accordion("DF-RISE options", open=True):
                c["masks"] = gr.Slider(1, LIMITS.max_masks, value=APP.rise_masks, step=1, label=f"Masks N (paper: 500; limit {LIMITS.max_masks})")
                c["keep"] = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Keep probability p")
                c["mode"] = gr.Radio(["next-latent", "paper"], value="next-latent", label="Score",
                                     info="next-latent compares like with like, by squared error (default); paper: as the public code")
                c["mask_kind"] = gr.Radio(["pixel", "grid"], value="pixel", label="Masks")
                c["estimator"] = gr.Radio(list(RISE_ESTIMATORS), value="contrast", label="Combine the masks",
                                          info="contrast: kept minus dropped (default, best measured); "
                                               "mean: over kept masks; sum: the paper's")
            c["seed"] = gr.Number(value=0, precision=0, label="Mask seed")
            with gr.Accordion("DF-CAM options", open=True):
                c["layer"] = gr.Dropdown(["sum of all layers"], value="sum of all layers", label="DF-CAM layer", allow_custom_value=True)
                c["target"] = gr.Radio(list(CAM_TARGETS), value=DFCam.target, label="Explained quantity", info=CAM_TARGET_INFO)
                c["weighting"] = gr.Radio(list(CAM_WEIGHTINGS), value=DFCam.weighting, label="Activations weighed by",
                                          info=CAM_WEIGHTING_INFO)
                c["layer_scale"] = gr.Radio(list(CAM_LAYER_SCALES), value=DFCam.layer_scale, label="Layers added",
                                            info=CAM_LAYER_SCALE_INFO)
                c["rectify"] = gr.Radio(list(RECTIFIERS), value=DFCam.rectify, label="Each layer's map kept as", info=CAM_RECTIFY_INFO)
            c["opacity"] = gr.Slider(0, 1, value=0.8, step=0.05, label="Overlay opacity")
            c["score"] = gr.Checkbox(value=True, label="Score with insertion / deletion")
            c["explain"] = gr.Button("Explain", variant="primary")
            c["notice"] = notice_line()
        with gr.Column(scale=2):
            with gr.Row():
                c["overlay"] = gr.Image(label="Saliency overlay", type="pil", height=340)
                c["chart"] = gr.Image(label="Insertion / deletion", type="pil", height=340)
            with gr.Row():
                c["npy"] = gr.File(label="Map (.npy, latent grid)")
                c["data"] = gr.JSON(label="Result")
    return c

"""The Saliency tab: where the model recovers the image at a step of the latest run, by a method or
a baseline, scored by insertion and deletion. Each method's options are drawn from its dataclass
fields (``explainer.methods.options``) and shown while that method is chosen; a new method (in
``explainer.methods.METHODS``) appears here by itself."""

from __future__ import annotations

import dataclasses

import gradio as gr
import numpy as np

from explainer.methods import METHODS
from explainer.methods.options import described
from explainer.methods.variants import VARIANTS
from explainer.render import charts, pictures

from . import gpu, settings
from .page import DEFAULT_SPEC, MIN_MAX_TICKS, colour_bar, intro, notice_line, refusal, run_id_input, serve_both, step_slider
from .session import by_run_id, check_step, current

SALIENCY_METHODS = {method.label: name for name, method in METHODS.items() if method.saliency_tab}  # label -> name
ALL_LAYERS = "sum of all layers"
RECOMMENDED, PAPER = "recommended", "the paper's settings"
STARTING = {"df-rise": {"n_masks": settings.APP.rise_masks}}  # the recommended preset's own values, for speed


def preset(name: str, which: str) -> dict:
    """Method ``name``'s described options under preset ``which``: the method's defaults
    (``RECOMMENDED``, with ``STARTING``), or the paper's variant's options on its defaults (``PAPER``;
    the defaults where the paper's rules are the method's own)."""
    values = {field.name: field.default for field in described(METHODS[name])}
    if which == PAPER:
        paper = VARIANTS.get(f"{name}-paper")
        return values | {key: value for key, value in (paper.options if paper else {}).items() if key in values}
    return values | STARTING.get(name, {})


def control(field: dataclasses.Field, value):
    """A control for a described field (``options.option``): its choices as a radio, its bounds as a
    slider, else a checkbox, a number or a text box, after the default's type."""
    about = field.metadata
    shown = {"label": about["label"], "info": about["help"] or None, "value": value}
    whole = isinstance(field.default, int) and not isinstance(field.default, bool)
    if about["choices"]:
        return gr.Radio(list(about["choices"]), **shown)
    if isinstance(field.default, bool):
        return gr.Checkbox(**shown)
    if about["bounds"]:
        low, high = about["bounds"]
        return gr.Slider(low, high, step=about["step"] or (1 if whole else (high - low) / 100), **shown)
    if isinstance(field.default, int | float):
        return gr.Number(precision=0 if whole else None, **shown)
    return gr.Textbox(**shown)


@dataclasses.dataclass
class MethodForm:
    """One method's option controls, by field name, in a group shown while the method is chosen."""

    group: gr.Accordion
    controls: dict[str, gr.components.Component]


def method_form(name: str, title: str, visible: bool, starting: dict) -> MethodForm | None:
    """Controls for the described fields of method ``name``, at ``starting`` values where given, else
    at the fields' defaults; ``None`` for a method without any."""
    fields = described(METHODS[name])
    if not fields:
        return None
    with gr.Accordion(f"{title}: fine options", open=False, visible=visible) as group:
        return MethodForm(group, {field.name: control(field, starting.get(field.name, field.default)) for field in fields})


def method_options(name: str, values: dict) -> dict:
    """Method ``name``'s options from ``values`` keyed (method, field name), where method ``None``
    stands for every method with that field; each as its default's type (a slider sends floats)."""
    options = {}
    for field in dataclasses.fields(METHODS[name]):
        for key in ((name, field.name), (None, field.name)):
            if key in values:
                value = values[key]
                options[field.name] = type(field.default)(value) if type(field.default) in (int, float) else value
    return options


class SaliencyTab:
    """The Saliency tab's components, by name; ``forms`` holds each method's option controls."""

    def __init__(self):
        intro("Where does the model recover the picture at this step? Pick a method and a step: the map shows which "
              "spots the step's result depends on, and the score says how well the map holds up.", "Why here")
        first = next(iter(SALIENCY_METHODS))
        with gr.Row():
            with gr.Column(scale=1):
                self.method = gr.Dropdown(list(SALIENCY_METHODS), value=first, label="Method")
                self.step = step_slider(settings.explained_step(DEFAULT_SPEC.steps))
                self.preset = gr.Radio([RECOMMENDED, PAPER], value=RECOMMENDED, label="Settings",
                                       info="Recommended: what works best on these models. The paper's: as the paper defines the method.")
                forms = {name: method_form(name, label, label == first, preset(name, RECOMMENDED)) for label, name in SALIENCY_METHODS.items()}
                self.forms: dict[str, MethodForm] = {name: form for name, form in forms.items() if form is not None}
                with self.forms["df-cam"].group:  # DF-CAM also gives a map per layer: the one shown
                    self.layer = gr.Dropdown([ALL_LAYERS], value=ALL_LAYERS, label="DF-CAM layer", allow_custom_value=True)
                self.opacity = gr.Slider(0, 1, value=0.8, step=0.05, label="Overlay opacity")
                self.score = gr.Checkbox(value=True, label="Score with insertion / deletion")
                self.explain = gr.Button("Explain", variant="primary")
                self.notice = notice_line()
            with gr.Column(scale=2):
                with gr.Row():
                    self.overlay = gr.Image(label="Where the step's result depends on", type="pil", height=340)
                    self.chart = gr.Image(label="How well the map holds up (insertion and deletion)", type="pil", height=340)
                colour_bar(charts.colour_bar("this map, from its least to its most", MIN_MAX_TICKS))
                self.summary = gr.Markdown("")  # the numbers that matter; all of them in Data
        with gr.Accordion("Data", open=False):
            with gr.Row():
                self.npy = gr.File(label="The map as numbers (.npy, one value per latent cell)")
                self.data = gr.JSON(label="The result")

    def outputs(self) -> list:
        return [self.overlay, self.chart, self.npy, self.data, self.layer]


def saliency(method, step, masks, keep, mode, mask_kind, seed, layer, opacity, score, estimator, rectify, target, weighting,
             layer_scale, session, run_id=""):
    """Where the model recovers the picture at a step of a finished run: a saliency map by DF-RISE,
    DF-CAM or DF-LIME (or a baseline), scored by how well it holds up under insertion and deletion.

    Args:
        method: "DF-RISE", "DF-CAM", "DF-LIME", "random baseline" or "centred baseline".
        step: The step of the run to explain (1-based).
        masks: DF-RISE's number of random masks; more give a smoother map and take longer.
        keep: DF-RISE's share of the picture each mask leaves in place, from 0.05 to 0.95.
        mode: How DF-RISE scores a masked result: "next-latent" (its distance to the real next step) or "paper".
        mask_kind: DF-RISE's masks: "pixel" (spot by spot) or "grid" (in blocks).
        seed: The seed of a seeded method's random masks or samples; the same seed gives the same map.
        layer: The DF-CAM layer whose map is shown, or "sum of all layers" (the result's "layers" names them).
        opacity: How strongly the map covers the picture, from 0 to 1.
        score: Whether to score the map by insertion and deletion (slower).
        estimator: How DF-RISE's masks add up: "contrast" (kept minus hidden), "mean" or "sum" (the paper's).
        rectify: What each DF-CAM layer's map keeps: "relu" (where it pushes the result up) or "abs" (either way).
        target: What DF-CAM explains: "guidance" (how much the prompt changes the prediction) or "sum" (the whole prediction).
        weighting: How DF-CAM reads a layer: "layercam", "hirescam" or "grad-cam" (the paper's).
        layer_scale: How DF-CAM's layers add up: "target" (by the share of the change each carries) or "min-max" (the paper's).
        session: The caller's session, kept by the app (not an API argument).
        run_id: The run_id that /denoise or /explain_image returned; empty for the latest run of this caller's session.

    Returns:
        the map over the picture
        the insertion and deletion chart (None unless scored)
        the map as a .npy file
        the result as JSON (scores, options, cost, layers)
        the DF-CAM layer choices
    """
    values = {("df-rise", "n_masks"): masks, ("df-rise", "keep"): keep, ("df-rise", "mode"): mode, ("df-rise", "mask"): mask_kind,
              (None, "seed"): seed, ("df-rise", "estimator"): estimator, ("df-cam", "rectify"): rectify,
              ("df-cam", "target"): target, ("df-cam", "weighting"): weighting, ("df-cam", "layer_scale"): layer_scale}
    return _explain(method, values, step, layer, opacity, score, session, run_id)


def _explain(method, values: dict, step, layer, opacity, score, session, run_id=""):
    try:
        session = by_run_id(session, run_id)
        run = current(session)[0]
        if method not in SALIENCY_METHODS:
            raise ValueError(f"method must be one of {list(SALIENCY_METHODS)}, got {method!r}.")
        name = SALIENCY_METHODS[method]
        options = method_options(name, values)
        METHODS[name](**options)  # option checks (limits from the config) before any GPU work
        check_step(run, step)
        explanation, scores = gpu.explain_on_device(run.model_id, run.for_computing(), name, options, int(step), bool(score))
    except ValueError as error:
        raise refusal("/saliency", error) from error
    saliency_map = explanation.saliency
    layers = sorted(explanation.per_layer or {})
    if layer and layer != ALL_LAYERS:
        if layer not in (explanation.per_layer or {}):
            raise refusal("/saliency", ValueError(f"Unknown layer {layer!r}; DF-CAM recorded {len(layers)} layers."))
        saliency_map = explanation.per_layer[layer]
    record = run.records[int(step) - 1]
    gpu.decode(run.model_id, [record])
    picture = pictures.for_display(pictures.step_picture(record, "prediction"), 320)
    path = session.file(f"saliency-{name}-{step}.npy")
    np.save(path, saliency_map)
    data = {
        "method": name, "step": explanation.step, "timestep": explanation.timestep, "options": explanation.options,
        "seconds": round(explanation.seconds, 3), "denoiser_calls": explanation.denoiser_calls, "layers": layers,
    }
    shares = explanation.layer_shares or {}
    if shares:
        data["layer_shares"] = {name: round(share, 4) for name, share in shares.items()}
    if scores:
        data |= {k: scores[k] for k in ("insertion_auc", "deletion_auc", "insertion", "deletion", "distance")}
    chart = charts.insertion_deletion_chart(scores) if scores else None
    by_share = sorted(layers, key=lambda name: -shares.get(name, 0.0))  # the layers that carry most first
    labelled = [(f"{name} ({shares[name]:.0%})" if name in shares else name, name) for name in by_share]
    layer_choices = gr.update(choices=[(ALL_LAYERS, ALL_LAYERS), *labelled], value=layer or ALL_LAYERS)
    return pictures.overlay(picture, saliency_map, float(opacity)), chart, str(path), data, layer_choices


def summary_line(data: dict) -> str:
    """The result's numbers that matter, in a line: the step, the scores (if scored) and the cost."""
    line = f"**{METHODS[data['method']].label}** at step {data['step']} (t = {data['timestep']:.4g})"
    if "insertion_auc" in data:
        line += (f" · insertion AUC **{data['insertion_auc']:.3f}** (lower is better) · deletion AUC "
                 f"**{data['deletion_auc']:.3f}** (higher is better)")
    return line + f" · {data['seconds']:.1f} s, {data['denoiser_calls']} model calls"


def build(session: gr.State) -> SaliencyTab:
    """The Saliency tab in the current Blocks context. The page sends the chosen method's controls;
    ``/saliency`` keeps its arguments (``saliency``), taken from DF-RISE's and DF-CAM's controls."""
    tab = SaliencyTab()
    keys = [(name, field) for name, form in tab.forms.items() for field in form.controls]

    def saliency_on_page(method, step, layer, opacity, score, *values):  # every form's controls, then the session
        result = _explain(method, dict(zip(keys, values[:-1])), step, layer, opacity, score, values[-1])
        return *result, summary_line(result[3])

    rise, cam = tab.forms["df-rise"].controls, tab.forms["df-cam"].controls
    api_inputs = [tab.method, tab.step, rise["n_masks"], rise["keep"], rise["mode"], rise["mask"], rise["seed"], tab.layer,
                  tab.opacity, tab.score, rise["estimator"], cam["rectify"], cam["target"], cam["weighting"], cam["layer_scale"]]
    page_inputs = [tab.method, tab.step, tab.layer, tab.opacity, tab.score]
    page_inputs += [control for form in tab.forms.values() for control in form.controls.values()]
    serve_both(tab.explain, saliency, api_inputs + [session, run_id_input()], tab.outputs(), "saliency", notice=tab.notice,
               page_handler=saliency_on_page, page_inputs=page_inputs + [session], page_outputs=tab.outputs() + [tab.summary],
               **gpu.queue())
    names = list(tab.forms)
    tab.method.change(lambda method: [gr.update(visible=SALIENCY_METHODS.get(method) == name) for name in names], tab.method,
                      [form.group for form in tab.forms.values()], api_visibility="private")
    controls = [(name, field, control) for name, form in tab.forms.items() for field, control in form.controls.items()]

    def apply_preset(which):  # every method's controls to the preset's values
        values = {name: preset(name, which) for name in tab.forms}
        return [gr.update(value=values[name][field]) for name, field, _ in controls]

    tab.preset.change(apply_preset, tab.preset, [control for *_, control in controls], api_visibility="private")
    return tab

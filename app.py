"""Diffusion X-Ray: the Gradio app. Layout and event wiring only; all computing is in explainer/."""

from __future__ import annotations

import gradio as gr
import numpy as np
import spaces

from explainer import config, export, plots, views
from explainer.models import load_model
from explainer.run import RunData, RunSettings, StepRecord, stream_runs
from explainer.schedules import parse_timestep_list
from explainer.session import OUTPUT_ROOT, Session

DEFAULT_MODEL = config.default_model_id()
DEFAULT_SPEC = config.MODELS[DEFAULT_MODEL]
LIMITS = config.LIMITS
AGGREGATIONS = ["this step", "range of steps", "all steps"]
ABOUT = (config.REPO_ROOT / "docs" / "about.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- running the model


def _settings(prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom) -> RunSettings:
    chosen = parse_timestep_list(custom) if schedule == "custom" else schedule
    return RunSettings(
        prompt=prompt or "",
        negative_prompt=negative or "",
        seed=int(seed),
        steps=int(steps),
        guidance=float(guidance),
        width=int(width),
        height=int(height),
        schedule=chosen,
        lam=float(lam),
        per_layer=True,
    ).validated()


def _gpu_duration(model_id, settings_dicts) -> int:
    spec = config.model_spec(model_id)
    return sum(config.gpu_seconds(spec, s["steps"], s["width"], s["height"]) for s in settings_dicts)


@spaces.GPU(duration=_gpu_duration)
def _run_on_device(model_id: str, settings_dicts: list[dict]):
    """The only GPU work of a run: yields CPU objects (see ``stream_runs``)."""
    yield from stream_runs(load_model(model_id), [RunSettings.from_dict(s) for s in settings_dicts])


def _stream(model_id: str, settings: list[RunSettings]):
    """Yield the list of RunData after every step of all runs, filled as records arrive."""
    try:
        spec = config.model_spec(model_id)
        model = load_model(spec.id)  # fails here, with a message, for a model that cannot load
        for one in settings:  # e.g. words outside the embedded model's vocabulary
            model.check_prompt(one.prompt)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    runs: list[RunData] = []
    for kind, index, item in _run_on_device(spec.id, [s.to_dict() for s in settings]):
        if kind == "start":
            runs.append(item)
        elif kind == "step":
            runs[index].records.append(item)
            if index == len(runs) - 1:  # every run has finished this step
                yield runs
        else:  # the finished run: its final image and reproduction record
            runs[index].final_array, runs[index].final_image = item.final_array, item.final_image
            runs[index].reproduction = item.reproduction  # in place: the session holds these objects


def _step_view(runs: list[RunData], step: int):
    """What the Denoise tab shows at one step (1-based) of the current runs."""
    first = runs[0]
    record = first.records[min(step, len(first.records)) - 1]
    pictures = []
    for which in (0, 1):
        if which < len(runs):
            other = runs[which].records[record.index - 1]
            pictures += [views.for_display(views.step_picture(other, "prediction")), views.for_display(views.step_picture(other, "noisy"))]
        else:
            pictures += [None, None]
    status = f"**{record.label}** · noise level σ = {record.sigma:.3g}"
    messages = [m for run in runs for m in run.messages]
    if messages:
        status += "  \n⚠️ " + " ".join(messages)
    chart = plots.noise_level_chart(first.timesteps, first.noise_levels, current=record.index)
    data = views.step_summary(first, record) | {"words": first.tokens.word_texts, "messages": messages}
    if len(runs) > 1:
        data["second_prompt"] = views.step_summary(runs[1], runs[1].records[record.index - 1])
    concepts = plots.concept_chart(
        list(range(1, len(first.timesteps) + 1)), views.concept_series(first), "Concept chart (cheap score, streaming)"
    )
    return (*pictures, status, chart, views.word_overlays(first, record), concepts, data)


def denoise(model_id, prompt, prompt_b, negative, seed, steps, guidance, width, height, schedule, lam, custom, session):
    """Run the model and stream every step: for each prompt the prediction view and the noisy view,
    then a status line, the noise-level chart, one attention overlay per word, the concept chart and
    the step's data as JSON (timestep, sigma, per-word scores). A second prompt runs from the same noise."""
    try:
        first = _settings(prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom)
        runs = [first] + ([RunSettings.from_dict(first.to_dict() | {"prompt": prompt_b})] if (prompt_b or "").strip() else [])
        runs = [one.validated() for one in runs]
    except ValueError as error:
        raise gr.Error(str(error)) from error
    session = session or Session()
    added = False
    for current in _stream(model_id, runs):
        if not added:
            session.add(current)
            added = True
        yield *_step_view(current, len(current[0].records)), session


def after_run(session: Session | None):
    """Open the scrubber and fill the other tabs' choices from the finished run."""
    run = session.run(0)
    words = views.token_labels(run)
    steps = len(run.records)
    groups = list(views.layer_groups(run))
    gif = export.animation(run, session.file(f"denoise-{id(run)}.gif"))
    return (
        gr.update(maximum=steps, value=steps, interactive=True),
        gr.update(choices=words, value=words[min(len(words) - 1, 1)] if words else None),
        gr.update(maximum=steps, value=steps),
        gr.update(maximum=steps, value=1),
        gr.update(maximum=steps, value=steps),
        gr.update(choices=groups, value=groups),
        str(gif),
    )


def show_step(session: Session | None, step: int):
    """Scrub back to a recorded step without recomputing."""
    try:
        return _step_view(_current(session), int(step))
    except ValueError as error:
        raise gr.Error(str(error)) from error


def _current(session: Session | None) -> list[RunData]:
    if session is None:
        raise ValueError("No run yet: run the model on the Denoise tab (or call /denoise) first.")
    return session.latest()


# ---------------------------------------------------------------- attention


def attention(word, step, aggregation, start, end, groups, view, opacity, include_special, which, session):
    """One word's cross-attention map: at a step, over a range of steps, or over all steps, for chosen
    layer groups. Returns the overlay, the raw map as a .npy file (H_lat x W_lat) and a JSON summary."""
    try:
        runs = _current(session)
        if which == "second prompt" and len(runs) < 2:
            raise ValueError("The latest run has no second prompt.")
        run = runs[1 if which == "second prompt" else 0]
        labels = views.token_labels(run, include_special)
        if word not in labels:
            raise ValueError(f"The word {word!r} is not in the prompt. Its words are: {', '.join(map(repr, labels))}.")
        chosen = _steps_for(run, aggregation, int(step), int(start), int(end))
        layer_groups = views.layer_groups(run)
        unknown = [g for g in (groups or []) if g not in layer_groups]
        if unknown:
            raise ValueError(f"Unknown layer groups {unknown}; this model has {list(layer_groups)}.")
        layers = [key for g in (groups or []) for key in layer_groups[g]] or None
        saliency = views.word_map(run, labels.index(word), chosen, include_special, layers)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    picture = views.for_display(views.step_picture(chosen[-1], view), 320)
    path = session.file(f"attention-{word}-{chosen[0].index}-{chosen[-1].index}.npy")
    np.save(path, saliency)
    summary = {
        "word": word,
        "steps": [r.index for r in chosen],
        "layers": layers or "all",
        "min": float(saliency.min()),
        "max": float(saliency.max()),
        "shape": list(saliency.shape),
    }
    return plots.overlay(picture, saliency, float(opacity)), str(path), summary


def _steps_for(run: RunData, aggregation: str, step: int, start: int, end: int) -> list[StepRecord]:
    total = len(run.records)
    for name, value in (("step", step), ("range start", start), ("range end", end)):
        if not 1 <= value <= total:
            raise ValueError(f"{name} must be between 1 and {total}, got {value}.")
    if aggregation == "this step":
        return [run.records[step - 1]]
    if aggregation == "range of steps":
        if start > end:
            raise ValueError(f"range start ({start}) must not be after range end ({end}).")
        return run.records[start - 1 : end]
    if aggregation == "all steps":
        return list(run.records)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")


# ---------------------------------------------------------------- concepts


def concepts(session):
    """Concept chart (cheap score per word per step), per-word totals, and the series as JSON."""
    try:
        runs = _current(session)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    return _concept_outputs(runs[0], "this run")


def _concept_outputs(run: RunData, title: str):
    series = views.concept_series(run)
    steps = list(range(1, len(run.records) + 1))
    totals = {label: float(sum(values)) for label, values in series.items()}
    data = {"steps": steps, "timesteps": run.timesteps, "score": "attention mass", "series": series, "totals": totals}
    return plots.concept_chart(steps, series, f"Concept chart: {title}"), plots.token_bars(totals, f"Totals: {title}"), data


def compare_schedules(model_id, prompt, negative, seed, steps, guidance, width, height, lam):
    """The same prompt and seed under the uniform, early and latter schedules, side by side
    (the paper's Fig. 6 and 11): three final images, three concept charts, three bar charts, JSON."""
    try:
        settings = [_settings(prompt, negative, seed, steps, guidance, width, height, kind, lam, "") for kind in config.SCHEDULE_KINDS]
    except ValueError as error:
        raise gr.Error(str(error)) from error
    for runs in _stream(model_id, settings):
        outputs, data = [], {}
        for kind, run in zip(config.SCHEDULE_KINDS, runs):
            picture = run.final_image or views.step_picture(run.records[-1], "prediction")
            chart, bars, series = _concept_outputs(run, kind)
            outputs += [views.for_display(picture, 256), chart, bars]
            data[kind] = series
        yield *outputs, data


# ---------------------------------------------------------------- export


def export_run(session):
    """A ZIP of the latest run (per-step pictures, maps as .npy and .png, run.json that reproduces it)
    and its animation (GIF)."""
    try:
        run = _current(session)[0]
        if not run.done:
            raise ValueError("The run is still going; export when it has finished.")
        archive = export.export_zip(run, session.file(f"run-{id(run)}.zip"))
        gif = export.animation(run, session.file(f"run-{id(run)}.gif"))
    except ValueError as error:
        raise gr.Error(str(error)) from error
    return str(archive), str(gif)


def _on_model_change(model_id):
    spec = config.model_spec(model_id)
    return spec.width, spec.height, spec.steps, spec.guidance, gr.update(samples=[[p] for p in spec.examples])


def _close_session(session: Session | None) -> None:
    if session is not None:
        session.close()


# ---------------------------------------------------------------- layout


def _denoise_tab():
    with gr.Row():
        with gr.Column(scale=1):
            c = {}
            c["prompt"] = gr.Textbox(label="Prompt", value=DEFAULT_SPEC.examples[0], max_lines=3)
            c["prompt_b"] = gr.Textbox(label="Second prompt (optional): compared from the same starting noise", max_lines=2)
            c["model_id"] = gr.Dropdown(choices=[(s.label, s.id) for s in config.MODELS.values()], value=DEFAULT_MODEL, label="Model")
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
                c["lam"] = gr.Slider(0, 200, value=config.DEFAULTS.lam, step=1, label="λ (schedule concentration)")
                c["custom"] = gr.Textbox(label="Custom timesteps (schedule = custom)", placeholder="999, 800, 600, 400, 200, 50")
                gr.Markdown(f"Limits: up to {LIMITS.max_steps} steps, sides {LIMITS.min_side}–{LIMITS.max_side} px in multiples of {LIMITS.side_multiple}.")
            c["run"] = gr.Button("Run", variant="primary")
            c["examples"] = gr.Dataset(components=[c["prompt"]], samples=[[p] for p in DEFAULT_SPEC.examples], label="Examples")
        with gr.Column(scale=2):
            c["status"] = gr.Markdown("Press **Run** to start.")
            with gr.Row():
                c["pred_a"] = gr.Image(label="Prediction view: the clean image the model predicts now", type="pil", height=300)
                c["noisy_a"] = gr.Image(label="Noisy view: the current latent x_t, decoded", type="pil", height=300)
            with gr.Row():
                c["pred_b"] = gr.Image(label="Second prompt: prediction view", type="pil", height=200)
                c["noisy_b"] = gr.Image(label="Second prompt: noisy view", type="pil", height=200)
            c["slider"] = gr.Slider(1, DEFAULT_SPEC.steps, value=1, step=1, label="Step (scrub after the run)", interactive=False)
            with gr.Row():
                c["chart"] = gr.Image(label="Noise level", show_label=False, type="pil", height=220)
                c["data"] = gr.JSON(label="This step's data")
            c["overlays"] = gr.Gallery(label="Cross-attention per word at this step (first prompt)", columns=6, height=220)
            c["animation"] = gr.File(label="Animation of the run (GIF)")
    return c


def _attention_tab():
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
            c["step"] = gr.Slider(1, DEFAULT_SPEC.steps, value=DEFAULT_SPEC.steps, step=1, label="Step")
            with gr.Row():
                c["start"] = gr.Slider(1, DEFAULT_SPEC.steps, value=1, step=1, label="Range start")
                c["end"] = gr.Slider(1, DEFAULT_SPEC.steps, value=DEFAULT_SPEC.steps, step=1, label="Range end")
            c["groups"] = gr.CheckboxGroup(label="Layers (block and resolution)", choices=[])
            c["view"] = gr.Radio(["prediction", "noisy"], value="prediction", label="Picture under the map")
            c["opacity"] = gr.Slider(0, 1, value=0.8, step=0.05, label="Overlay opacity")
            c["which"] = gr.Radio(["first prompt", "second prompt"], value="first prompt", label="Prompt")
            c["show"] = gr.Button("Show", variant="primary")
        with gr.Column(scale=2):
            c["overlay"] = gr.Image(label="Attention overlay", type="pil", height=360)
            gr.Image(value=plots.colour_scale(), label="Colour scale: blue = least, red = most of this map (min-max)", height=60, interactive=False)
            with gr.Row():
                c["npy"] = gr.File(label="Raw map (.npy, latent grid)")
                c["summary"] = gr.JSON(label="Map data")
    return c


def _concepts_tab():
    c = {}
    gr.Markdown(
        "**Which concept is drawn at each step?** The chart shows each word's *cheap score*: its share of the "
        "cross-attention at that step, min-max normalised across the words (SPEC §3)."
    )
    c["refresh"] = gr.Button("Show for the latest run")
    with gr.Row():
        c["chart"] = gr.Image(label="Concept chart", type="pil", height=300)
        c["bars"] = gr.Image(label="Summed over steps", type="pil", height=300)
    c["data"] = gr.JSON(label="Scores per step")
    gr.Markdown("### Compare schedules\nThe Denoise tab's prompt and seed under the three schedules (λ from its settings).")
    c["compare"] = gr.Button("Compare uniform / early / latter", variant="primary")
    c["grid"] = []
    with gr.Row():
        for kind in config.SCHEDULE_KINDS:
            with gr.Column():
                c["grid"] += [
                    gr.Image(label=f"{kind}: image", type="pil", height=200),
                    gr.Image(label=f"{kind}: concept chart", type="pil", height=200),
                    gr.Image(label=f"{kind}: totals", type="pil", height=200),
                ]
    c["compare_data"] = gr.JSON(label="Scores per schedule")
    return c


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Diffusion X-Ray", delete_cache=(3600, 3600)) as demo:
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
        session = gr.State(None, delete_callback=_close_session)
        with gr.Tab("Denoise"):
            d = _denoise_tab()
        with gr.Tab("Attention"):
            a = _attention_tab()
        with gr.Tab("Concepts"):
            k = _concepts_tab()
        with gr.Tab("Export"):
            gr.Markdown("Download the latest run: every step's pictures, attention maps (.npy and .png) and `run.json`, which records every setting and library version needed to make it again.")
            export_button = gr.Button("Export the latest run")
            with gr.Row():
                zip_file, gif_file = gr.File(label="Run (ZIP)"), gr.File(label="Animation (GIF)")
        with gr.Tab("About"):
            gr.Markdown(ABOUT)

        settings = [d[n] for n in ("model_id", "prompt", "prompt_b", "negative", "seed", "steps", "guidance", "width", "height", "schedule", "lam", "custom")]
        step_outputs = [d[n] for n in ("pred_a", "noisy_a", "pred_b", "noisy_b", "status", "chart", "overlays")] + [k["chart"], d["data"]]
        run_event = d["run"].click(
            denoise, settings + [session], step_outputs + [session], api_name="denoise",
            concurrency_limit=LIMITS.max_concurrent_runs, concurrency_id="gpu",
        )
        run_event.success(
            after_run, session, [d["slider"], a["word"], a["step"], a["start"], a["end"], a["groups"], d["animation"]],
            api_visibility="private",
        )
        d["slider"].release(show_step, [session, d["slider"]], step_outputs, api_visibility="private")
        d["model_id"].change(_on_model_change, d["model_id"], [d["width"], d["height"], d["steps"], d["guidance"], d["examples"]], api_visibility="private")
        d["examples"].click(lambda sample: sample[0], d["examples"], d["prompt"], api_visibility="private")

        attention_inputs = [a[n] for n in ("word", "step", "aggregation", "start", "end", "groups", "view", "opacity", "include_special", "which")]
        a["show"].click(attention, attention_inputs + [session], [a["overlay"], a["npy"], a["summary"]], api_name="attention")
        k["refresh"].click(concepts, session, [k["chart"], k["bars"], k["data"]], api_name="concepts")
        compare_inputs = [d[n] for n in ("model_id", "prompt", "negative", "seed", "steps", "guidance", "width", "height", "lam")]
        k["compare"].click(
            compare_schedules, compare_inputs, k["grid"] + [k["compare_data"]], api_name="compare_schedules",
            concurrency_limit=LIMITS.max_concurrent_runs, concurrency_id="gpu",
        )
        export_button.click(export_run, session, [zip_file, gif_file], api_name="export")
    demo.queue(max_size=LIMITS.max_queue, default_concurrency_limit=LIMITS.max_concurrent_runs)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch(allowed_paths=[str(OUTPUT_ROOT)])

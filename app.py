"""Diffusion X-Ray: the Gradio app. Handlers and event wiring; the components are in ui_tabs.py, all computing in explainer/."""

from __future__ import annotations

import dataclasses

import gradio as gr
import numpy as np
import spaces

from explainer import config, export, metrics, plots, views
from explainer.methods import METHODS, DFCam, TokenRelevance, relevance_series
from explainer.models import load_model, preferred_device, preload, share_cpu_cores
from explainer.run import RunData, RunSettings, StepRecord, stream_runs
from explainer.schedules import parse_timestep_list
from explainer.session import OUTPUT_ROOT, Session
from explainer.streaming import UpdateBudget, run_ahead
from ui_tabs import AGGREGATIONS, DEFAULT_MODEL, SALIENCY_METHODS, attention_tab, concepts_tab, denoise_tab, saliency_tab

LIMITS = config.LIMITS
ABOUT = (config.REPO_ROOT / "docs" / "about.md").read_text(encoding="utf-8")


def models_to_preload(zero_gpu: bool) -> list[str]:
    """On ZeroGPU, the Hub models load at startup in the main process (see ``models.preload``);
    elsewhere every model loads when first asked for."""
    return [spec.id for spec in config.MODELS.values() if spec.hub] if zero_gpu else []


def _preload_models() -> None:
    for model_id, why in preload(models_to_preload(spaces.config.Config.zero_gpu)).items():
        print(f"{model_id} did not load at startup (it will be tried again when asked for): {why}")


_preload_models()


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
        per_group=True,
    ).validated()


def _gpu_duration(model_id, settings_dicts) -> int:
    spec = config.model_spec(model_id)
    return sum(config.gpu_seconds(spec, s["steps"], s["width"], s["height"]) for s in settings_dicts)


@spaces.GPU(duration=_gpu_duration)
def _run_on_device(model_id: str, settings_dicts: list[dict]):
    """The only GPU work of a run: yields CPU objects (see ``stream_runs``)."""
    yield from stream_runs(load_model(model_id), [RunSettings.from_dict(s) for s in settings_dicts])


def _stream(model_id: str, settings: list[RunSettings]):
    """Yield (runs, step, waiting) after every step done by all runs: the list of RunData, filled as
    records arrive, the step, and how many newer steps are already done (the page is behind)."""
    try:
        spec = config.model_spec(model_id)
        model = load_model(spec.id)  # fails here, with a message, for a model that cannot load
        for one in settings:  # e.g. words outside the embedded model's vocabulary
            model.check_prompt(one.prompt)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    # The run goes ahead in a thread: rendering and sending an update never holds it back.
    for (runs, step), waiting in run_ahead(_collect(spec.id, settings)):
        yield runs, step, waiting


def _up_to(runs: list[RunData], step: int) -> list[RunData]:
    """The runs as they were at ``step``: the run thread may already be appending later records."""
    return [dataclasses.replace(run, records=run.records[:step]) for run in runs]


def _collect(model_id: str, settings: list[RunSettings]):
    """Yield (runs, step) each time every run has finished ``step``; the runs fill in place."""
    runs: list[RunData] = []
    for kind, index, item in _run_on_device(model_id, [s.to_dict() for s in settings]):
        if kind == "start":
            runs.append(item)
        elif kind == "step":
            runs[index].records.append(item)
            if index == len(runs) - 1:  # every run has finished this step
                yield runs, item.index
        else:  # the finished run: its final image, reproduction record and the layer groups its steps filled
            runs[index].final_array, runs[index].final_image = item.final_array, item.final_image
            runs[index].reproduction = item.reproduction  # in place: the session holds these objects
            runs[index].attention_groups = item.attention_groups


CONCEPT_CHART_TITLE = "Concept chart (cheap score)"


def _step_view(
    runs: list[RunData], step: int, streaming: bool = False, since: int | None = None,
    numbers_only: bool = False, pictures_since: int | None = None,
):
    """What the Denoise tab shows at one step (1-based) of the current runs. The JSON's "steps"
    lists the facts of every step from ``since`` (default: this one) to this one: while streaming,
    steps that a newer one overtook before the page was ready go out with it. ``numbers_only``
    leaves the pictures and charts as they are (a light update: status line and JSON);
    ``pictures_since`` is the first step after the last update that had pictures (default: ``since``)."""
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
    pictures = []
    for which in (0, 1):
        if which < len(runs):
            other = runs[which].records[record.index - 1]
            pictures += [views.for_display(views.step_picture(other, "prediction")), views.for_display(views.step_picture(other, "noisy"))]
        else:
            pictures += [None, None]
    chart = plots.noise_level_chart(tuple(first.timesteps), tuple(first.noise_levels)).at(record.index)
    total = len(first.timesteps)
    if streaming and record.index == 1:  # one point says nothing yet; the first update comes sooner
        concepts = gr.skip()
    elif streaming:  # painted on a chart drawn once per run shape: a matplotlib redraw costs ~200 ms
        series = views.concept_series(first)
        concepts = plots.streaming_concept_chart(total, tuple(series), CONCEPT_CHART_TITLE).draw(series)
    else:
        concepts = plots.concept_chart(list(range(1, total + 1)), views.concept_series(first), CONCEPT_CHART_TITLE)
    period = max(1, total // 5)
    unpictured = range(pictures_since or covered.start + 1, record.index + 1)
    if streaming and record.index != total and not any(i % period == 0 for i in unpictured):
        # one picture per word: while streaming they follow every fifth of the run (and the last step)
        overlays = gr.skip()
    else:
        overlays = views.word_overlays(first, record, max_side=LIMITS.overlay_gallery_side)
    return (*pictures, status, chart, overlays, concepts, data)


def denoise(model_id, prompt, prompt_b, negative, seed, steps, guidance, width, height, schedule, lam, custom, session):
    """Run the model and stream its steps: for each prompt the prediction view and the noisy view,
    then a status line, the noise-level chart, one attention overlay per word, the concept chart and
    the step's data as JSON (timestep, sigma, per-word scores; "steps": the same for every step
    since the last update, so none is lost when the page falls behind). A second prompt runs from
    the same noise."""
    try:
        first = _settings(prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom)
        runs = [first] + ([RunSettings.from_dict(first.to_dict() | {"prompt": prompt_b})] if (prompt_b or "").strip() else [])
        runs = [one.validated() for one in runs]
    except ValueError as error:
        raise gr.Error(str(error)) from error
    session = session or Session()
    added = False
    last_sent = 0
    budget = UpdateBudget(LIMITS.cpu_stream_share if preferred_device()[0].type == "cpu" else None, LIMITS.max_update_gap_s)
    last_pictured = 0
    for current, step, waiting in _stream(model_id, runs):
        if not added:
            session.add(current)
            added = True
        if waiting:
            continue  # a newer step is done: this one's facts go out with it
        pictures = step == len(current[0].timesteps) or budget.allows()
        if not (pictures or budget.due()):
            continue  # drawing would slow a CPU run, and the page had news a moment ago
        with budget.spending():
            view = _step_view(
                _up_to(current, step), step, streaming=True, since=last_sent + 1,
                numbers_only=not pictures, pictures_since=last_pictured + 1,
            )
            yield *view, session
        last_sent = step
        last_pictured = step if pictures else last_pictured


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
        gr.update(maximum=steps, value=config.explained_step(steps)),
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
        saliency = views.word_map(run, labels.index(word), chosen, include_special, groups)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    picture = views.for_display(views.step_picture(chosen[-1], view), 320)
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


def _relevance_duration(model_id, run, *_rectify) -> int:  # the rectifier does not change the work
    spec = config.model_spec(model_id)
    return config.gpu_seconds(spec, 3 * len(run.records), run.settings.width, run.settings.height)  # fwd + bwd per step


@spaces.GPU(duration=_relevance_duration)
def _relevance_on_device(model_id: str, run: RunData, rectify: str = TokenRelevance.rectify) -> dict:
    return relevance_series(load_model(model_id), run, method=TokenRelevance(rectify=rectify))


def relevance(rectify, session):
    """The paper's concept measure: gradient-weighted attention relevance (SPEC §3) of every word at
    every step of the latest run (one forward and backward pass per step), as a chart, totals and JSON.
    ``rectify``: "abs" (default) keeps |gradient x attention|, "relu" the paper's positive part."""
    try:
        TokenRelevance(rectify=rectify)  # the option's check, before any GPU work
        run = _current(session)[0]
        series = _relevance_on_device(run.model_id, run.for_computing(), rectify)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    totals = {label: float(sum(values)) for label, values in series["scores"].items()}
    data = {"steps": series["steps"], "timesteps": run.timesteps, "score": "token relevance", "rectify": rectify,
            "series": series["scores"], "totals": totals}
    chart = plots.concept_chart(series["steps"], series["scores"], "Concept chart: token relevance (gradient)", "relevance")
    return chart, plots.token_bars(totals, "Relevance summed over steps"), data


def compare_schedules(model_id, prompt, negative, seed, steps, guidance, width, height, lam):
    """The same prompt and seed under the uniform, early and latter schedules, side by side
    (the paper's Fig. 6 and 11): three final images, three concept charts, three bar charts, JSON."""
    try:
        settings = [_settings(prompt, negative, seed, steps, guidance, width, height, kind, lam, "") for kind in config.SCHEDULE_KINDS]
    except ValueError as error:
        raise gr.Error(str(error)) from error
    for runs, step, waiting in _stream(model_id, settings):
        if waiting:  # overtaken: every update carries the whole series so far
            continue
        outputs, data = [], {}
        for kind, run in zip(config.SCHEDULE_KINDS, _up_to(runs, step)):
            picture = run.final_image or views.step_picture(run.records[-1], "prediction")
            chart, bars, series = _concept_outputs(run, kind)
            outputs += [views.for_display(picture, 256), chart, bars]
            data[kind] = series
        yield *outputs, data


# ---------------------------------------------------------------- saliency

def _saliency_options(name, masks, keep, mode, mask_kind, seed, estimator="contrast", rectify=DFCam.rectify,
                      target=DFCam.target, weighting=DFCam.weighting, layer_scale=DFCam.layer_scale) -> dict:
    if name == "df-rise":
        return {"n_masks": int(masks), "keep": float(keep), "mode": mode, "mask": mask_kind, "seed": int(seed),
                "estimator": estimator}
    if name == "df-cam":
        return {"rectify": rectify, "target": target, "weighting": weighting, "layer_scale": layer_scale}
    if name == "df-lime":
        return {"seed": int(seed)}
    if name == "random":
        return {"seed": int(seed)}
    return {}


def _saliency_duration(model_id, run, name, options, step, score) -> int:
    spec = config.model_spec(model_id)
    calls = {"df-rise": options.get("n_masks", 500) / 16, "df-lime": 1000 / 16, "df-cam": 3}.get(name, 0)
    calls += 2 * (run.latent_size[0] + 1) / 8 if score else 0
    return config.gpu_seconds(spec, int(calls) + 1, run.settings.width, run.settings.height)


@spaces.GPU(duration=_saliency_duration)
def _explain_on_device(model_id, run: RunData, name: str, options: dict, step: int, score: bool):
    """The GPU work of the Saliency tab: one explanation, and its insertion/deletion scores."""
    model = load_model(model_id)
    explanation = METHODS[name](**options).explain(model, run, step)
    scores = metrics.insertion_deletion(model, run, step, explanation.saliency) if score else None
    return explanation, scores


def saliency(method, step, masks, keep, mode, mask_kind, seed, layer, opacity, score, estimator, rectify, target, weighting,
             layer_scale, session):
    """Where does the model recover the image at this step? A DF-RISE, DF-CAM or DF-LIME map (or a
    baseline) of the latest run, its overlay, and its insertion and deletion curves with their AUC."""
    try:
        run = _current(session)[0]
        if method not in SALIENCY_METHODS:
            raise ValueError(f"method must be one of {list(SALIENCY_METHODS)}, got {method!r}.")
        name = SALIENCY_METHODS[method]
        options = _saliency_options(name, masks, keep, mode, mask_kind, seed, estimator, rectify, target, weighting, layer_scale)
        METHODS[name](**options)  # option checks (limits from the config) before any GPU work
        if not 1 <= int(step) <= len(run.records):
            raise ValueError(f"step must be between 1 and {len(run.records)}, got {step}.")
        explanation, scores = _explain_on_device(run.model_id, run.for_computing(), name, options, int(step), bool(score))
    except ValueError as error:
        raise gr.Error(str(error)) from error
    saliency_map = explanation.saliency
    layers = sorted(explanation.per_layer or {})
    if layer and layer != "sum of all layers":
        if layer not in (explanation.per_layer or {}):
            raise gr.Error(f"Unknown layer {layer!r}; DF-CAM recorded {len(layers)} layers.")
        saliency_map = explanation.per_layer[layer]
    record = run.records[int(step) - 1]
    picture = views.for_display(views.step_picture(record, "prediction"), 320)
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
    chart = plots.insertion_deletion_chart(scores) if scores else None
    by_share = sorted(layers, key=lambda name: -shares.get(name, 0.0))  # the layers that carry most first
    labelled = [(f"{name} ({shares[name]:.0%})" if name in shares else name, name) for name in by_share]
    layer_choices = gr.update(choices=[("sum of all layers", "sum of all layers"), *labelled], value=layer or "sum of all layers")
    return plots.overlay(picture, saliency_map, float(opacity)), chart, str(path), data, layer_choices


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
            d = denoise_tab()
        with gr.Tab("Attention"):
            a = attention_tab()
        with gr.Tab("Concepts"):
            k = concepts_tab()
        with gr.Tab("Saliency"):
            sal = saliency_tab()
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
            after_run, session, [d["slider"], a["word"], a["step"], a["start"], a["end"], a["groups"], d["animation"], sal["step"]],
            api_visibility="private",
        )
        d["slider"].release(show_step, [session, d["slider"]], step_outputs, api_visibility="private")
        d["model_id"].change(_on_model_change, d["model_id"], [d["width"], d["height"], d["steps"], d["guidance"], d["examples"]], api_visibility="private")
        d["examples"].click(lambda sample: sample[0], d["examples"], d["prompt"], api_visibility="private")

        attention_inputs = [a[n] for n in ("word", "step", "aggregation", "start", "end", "groups", "view", "opacity", "include_special", "which")]
        a["show"].click(attention, attention_inputs + [session], [a["overlay"], a["npy"], a["summary"]], api_name="attention")
        k["refresh"].click(concepts, session, [k["chart"], k["bars"], k["data"]], api_name="concepts")
        k["relevance"].click(
            relevance, [k["rectify"], session], [k["chart"], k["bars"], k["data"]], api_name="relevance",
            concurrency_limit=LIMITS.max_concurrent_runs, concurrency_id="gpu",
        )
        compare_inputs = [d[n] for n in ("model_id", "prompt", "negative", "seed", "steps", "guidance", "width", "height", "lam")]
        k["compare"].click(
            compare_schedules, compare_inputs, k["grid"] + [k["compare_data"]], api_name="compare_schedules",
            concurrency_limit=LIMITS.max_concurrent_runs, concurrency_id="gpu",
        )
        saliency_inputs = [sal[n] for n in ("method", "step", "masks", "keep", "mode", "mask_kind", "seed", "layer", "opacity",
                                            "score", "estimator", "rectify", "target", "weighting", "layer_scale")]
        sal["explain"].click(
            saliency, saliency_inputs + [session], [sal["overlay"], sal["chart"], sal["npy"], sal["data"], sal["layer"]],
            api_name="saliency", concurrency_limit=LIMITS.max_concurrent_runs, concurrency_id="gpu",
        )
        export_button.click(export_run, session, [zip_file, gif_file], api_name="export")
    demo.queue(max_size=LIMITS.max_queue, default_concurrency_limit=LIMITS.max_concurrent_runs)
    _poll_queue_less(demo)
    return demo


def _poll_queue_less(demo: gr.Blocks) -> None:
    """Let Gradio's queue look for new events every ``LIMITS.queue_poll_s`` instead of every 1 ms,
    and for progress every ``LIMITS.progress_poll_s`` (Gradio 6 has no public setting for either;
    a test checks that they reach the queue's loops)."""
    queue = demo._queue
    queue.sleep_when_free = max(queue.sleep_when_free, LIMITS.queue_poll_s)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, LIMITS.progress_poll_s)


demo = build_demo()


def serve() -> None:
    """Start the server as ``python app.py`` does."""
    share_cpu_cores(LIMITS.max_concurrent_runs)  # a CPU server: each concurrent run gets its cores
    demo.launch(allowed_paths=[str(OUTPUT_ROOT)])


if __name__ == "__main__":
    serve()

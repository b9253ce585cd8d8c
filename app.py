"""Diffusion X-Ray: the Gradio app. Handlers and event wiring; the components are in ui_tabs.py, all computing in explainer/."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging

import gradio as gr
import numpy as np
import spaces

from explainer import config, export, images, metrics, plots, views
from explainer.methods import METHODS, DFCam, DFLime, DFRise, TokenRelevance, relevance_series
from explainer.models import check_loadable, load_model, preferred_device, preload, share_cpu_cores
from explainer.run import RunData, RunSettings, StepRecord, attach_views, stream_runs, undecoded, view_latents
from explainer.schedules import parse_timestep_list
from ui.session import OUTPUT_ROOT, Session
from ui.settings import APP, explained_step, gpu_seconds
from ui.streaming import UpdateBudget, run_ahead
from ui_tabs import AGGREGATIONS, DEFAULT_MODEL, SALIENCY_METHODS, attention_tab, concepts_tab, denoise_tab, notice_line, saliency_tab

ABOUT = (config.REPO_ROOT / "docs" / "about.md").read_text(encoding="utf-8")
log = logging.getLogger("diffusion_xray")


def on_gpu() -> bool:
    return preferred_device()[0].type == "cuda"


# ---------------------------------------------------------------- refusals


def refusal(endpoint: str, error: Exception) -> gr.Error:
    """A refused request: one log line (the caller's input, not a fault of the app: no traceback)
    and the error that carries the message to the page or the API caller."""
    log.warning("refused %s: %s", endpoint, error)
    return gr.Error(str(error), print_exception=False)


class XRayBlocks(gr.Blocks):
    """gr.Blocks whose refusals by Gradio itself (a slider's bound, a choice not in a list) are one
    log line each, as the app's own are, instead of a traceback."""

    async def process_api(self, block_fn, *args, **kwargs):
        try:
            return await super().process_api(block_fn, *args, **kwargs)
        except gr.Error as error:
            if error.print_exception:
                function = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
                raise refusal(f"/{function.api_name or function.name}", error.message) from error
            raise


def on_page(handler, outputs: int, notice: int | None = None):
    """The page's twin of an API handler. A refused request (or a fault) leaves every output as it
    was, so the last good results stay on the page, and says what happened in output ``notice``
    and in a toast; the API twin raises instead, so that a client gets the message as an error.
    ``notice=None``: the page's version has one more output, the tab's notice line, cleared on success."""
    count = outputs + (notice is None)
    where = count - 1 if notice is None else notice

    def refused(message: str) -> tuple:
        gr.Warning(message)
        update = [gr.skip()] * count
        update[where] = f"⚠️ **Refused:** {message}  \nThe results shown are from before."
        return tuple(update)

    def with_notice(result) -> tuple:
        result = result if isinstance(result, tuple) else (result,)
        return (*result, "") if notice is None else result

    def failed(error: Exception) -> tuple:
        if isinstance(error, gr.Error):
            return refused(error.message)  # logged where it was raised
        log.exception("%s failed", handler.__name__)  # a fault of the app: the trace goes to the log
        return refused(f"something went wrong ({type(error).__name__}: {error}).")

    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args):
            try:
                for result in handler(*args):
                    yield with_notice(result)
            except Exception as error:
                yield failed(error)
        return stream

    @functools.wraps(handler)
    def call(*args):
        try:
            return with_notice(handler(*args))
        except Exception as error:
            return failed(error)
    return call


def models_to_preload(zero_gpu: bool) -> list[str]:
    """On ZeroGPU, the Hub models load at startup in the main process (see ``models.preload``);
    elsewhere every model loads when first asked for."""
    return [spec.id for spec in config.MODELS.values() if spec.hub] if zero_gpu else []


def _preload_models() -> None:
    for model_id, why in preload(models_to_preload(spaces.config.Config.zero_gpu)).items():
        print(f"{model_id} did not load at startup (it will be tried again when asked for): {why}")


_preload_models()


# ---------------------------------------------------------------- running the model


def _settings(model_id, prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom) -> RunSettings:
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
        vae_decode_every=config.run_decode_every(config.model_spec(model_id), on_gpu()),
    ).validated()


def _gpu_duration(model_id, settings_dicts) -> int:
    spec = config.model_spec(model_id)
    return sum(gpu_seconds(spec, s["steps"], s["width"], s["height"]) for s in settings_dicts)


@spaces.GPU(duration=_gpu_duration)
def _run_on_device(model_id: str, settings_dicts: list[dict]):
    """The only GPU work of a run: yields CPU objects (see ``stream_runs``)."""
    yield from stream_runs(load_model(model_id), [RunSettings.from_dict(s) for s in settings_dicts])


def _stream(model_id: str, settings: list[RunSettings], endpoint: str):
    """Yield (runs, step, waiting) after every step done by all runs: the list of RunData, filled as
    records arrive, the step, and how many newer steps are already done (the page is behind)."""
    try:
        spec = config.model_spec(model_id)
        model = load_model(spec.id)  # fails here, with a message, for a model that cannot load
        for one in settings:  # e.g. words outside the embedded model's vocabulary
            model.check_prompt(one.prompt)
    except ValueError as error:
        raise refusal(endpoint, error) from error
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
        overlays = views.word_overlays(first, record, max_side=APP.overlay_gallery_side)
    return (*pictures, status, chart, overlays, concepts, data)


def denoise(model_id, prompt, prompt_b, negative, seed, steps, guidance, width, height, schedule, lam, custom, session):
    """Run the model and stream its steps: for each prompt the prediction view and the noisy view,
    then a status line, the noise-level chart, one attention overlay per word, the concept chart and
    the step's data as JSON (timestep, sigma, per-word scores; "steps": the same for every step
    since the last update, so none is lost when the page falls behind). A second prompt runs from
    the same noise."""
    try:
        first = _settings(model_id, prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom)
        runs = [first] + ([RunSettings.from_dict(first.to_dict() | {"prompt": prompt_b})] if (prompt_b or "").strip() else [])
        runs = [one.validated() for one in runs]
    except ValueError as error:
        raise refusal("/denoise", error) from error
    session = session or Session()
    added = False
    last_sent = 0
    budget = UpdateBudget(APP.cpu_stream_share if preferred_device()[0].type == "cpu" else None, APP.max_update_gap_s)
    last_pictured = 0
    for current, step, waiting in _stream(model_id, runs, "/denoise"):
        if not added:
            session.add(current)
            added = True
        if waiting:
            continue  # a newer step is done: this one's facts go out with it
        pictures = step == len(current[0].timesteps) or budget.allows()
        if not (pictures or budget.due()):
            continue  # drawing would slow a CPU run, and the page had news a moment ago
        with budget.spending():
            if pictures and not on_gpu():  # a CPU run decodes its last step only: the shown steps here
                _decode(model_id, [run.records[step - 1] for run in current])
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
    _decode(run.model_id, run.records)  # every frame of the animation
    gif = export.animation(run, session.file(f"{export.file_stem(run)}.gif"))
    return (
        gr.update(maximum=steps, value=steps, interactive=True),
        gr.update(choices=words, value=words[min(len(words) - 1, 1)] if words else None),
        gr.update(maximum=steps, value=steps),
        gr.update(maximum=steps, value=1),
        gr.update(maximum=steps, value=steps),
        gr.update(choices=groups, value=groups),
        str(gif),
        gr.update(maximum=steps, value=explained_step(steps)),
    )


def show_step(session: Session | None, step: int):
    """Scrub back to a recorded step without recomputing."""
    try:
        runs = _current(session)
        if not 1 <= int(step) <= len(runs[0].records):
            raise ValueError(f"step must be between 1 and {len(runs[0].records)}, got {step}.")
    except ValueError as error:
        raise refusal("scrub", error) from error
    _decode(runs[0].model_id, [run.records[int(step) - 1] for run in runs])  # a step the run did not decode
    return _step_view(runs, int(step))


def _decode_duration(model_id, latents) -> int:
    spec = config.model_spec(model_id)  # a decode costs about a step at the model's own size
    return gpu_seconds(spec, len(latents), spec.width, spec.height)


@spaces.GPU(duration=_decode_duration)
def _decode_on_device(model_id: str, latents: list) -> list:
    """VAE-decode latents into pictures (the views of steps the run did not decode)."""
    return images.decode_in_batches(load_model(model_id), latents)


def _decode(model_id: str, records: list[StepRecord]) -> None:
    """Give the records the VAE views the run left out, in place; a no-op for decoded ones."""
    missing = undecoded(records)
    if missing:
        attach_views(missing, _decode_on_device(model_id, view_latents(missing)))


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
        raise refusal("/attention", error) from error
    _decode(run.model_id, [chosen[-1]])
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
        raise refusal("/concepts", error) from error
    return _concept_outputs(runs[0], "this run")


def _concept_outputs(run: RunData, title: str):
    series = views.concept_series(run)
    steps = list(range(1, len(run.records) + 1))
    totals = {label: float(sum(values)) for label, values in series.items()}
    data = {"steps": steps, "timesteps": run.timesteps, "score": "attention mass", "series": series, "totals": totals}
    return plots.concept_chart(steps, series, f"Concept chart: {title}"), plots.token_bars(totals, f"Totals: {title}"), data


def _relevance_duration(model_id, run, *_rectify) -> int:  # the rectifier does not change the work
    spec = config.model_spec(model_id)
    return gpu_seconds(spec, 3 * len(run.records), run.settings.width, run.settings.height)  # fwd + bwd per step


@spaces.GPU(duration=_relevance_duration)
def _relevance_on_device(model_id: str, run: RunData, rectify: str = TokenRelevance.rectify) -> dict:
    return relevance_series(load_model(model_id), run, method=TokenRelevance(rectify=rectify))


def relevance(rectify, session):
    """The paper's concept measure: gradient-weighted attention relevance (docs/methods.md, Token relevance) of every word at
    every step of the latest run (one forward and backward pass per step), as a chart, totals and JSON.
    ``rectify``: "abs" (default) keeps |gradient x attention|, "relu" the paper's positive part."""
    try:
        TokenRelevance(rectify=rectify)  # the option's check, before any GPU work
        run = _current(session)[0]
        series = _relevance_on_device(run.model_id, run.for_computing(), rectify)
    except ValueError as error:
        raise refusal("/relevance", error) from error
    totals = {label: float(sum(values)) for label, values in series["scores"].items()}
    data = {"steps": series["steps"], "timesteps": run.timesteps, "score": "token relevance", "rectify": rectify,
            "series": series["scores"], "totals": totals}
    chart = plots.concept_chart(series["steps"], series["scores"], "Concept chart: token relevance (gradient)", "relevance")
    return chart, plots.token_bars(totals, "Relevance summed over steps"), data


def compare_schedules(model_id, prompt, negative, seed, steps, guidance, width, height, lam):
    """The same prompt and seed under the uniform, early and latter schedules, side by side
    (the paper's Fig. 6 and 11): three final images, three concept charts, three bar charts, JSON."""
    try:
        settings = [_settings(model_id, prompt, negative, seed, steps, guidance, width, height, kind, lam, "")
                    for kind in config.SCHEDULE_KINDS]
    except ValueError as error:
        raise refusal("/compare_schedules", error) from error
    for runs, step, waiting in _stream(model_id, settings, "/compare_schedules"):
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
    perturbed = {"df-rise": options.get("n_masks", DFRise.n_masks), "df-lime": options.get("n_samples", DFLime.n_samples)}
    batch = options.get("batch_size", DFRise.batch_size)
    calls = -(-perturbed[name] // batch) if name in perturbed else 3 if name == "df-cam" else 0  # DF-CAM: forward and backward
    calls += 2 * (run.latent_size[0] + 1) / 8 if score else 0
    return gpu_seconds(spec, int(calls) + 1, run.settings.width, run.settings.height)


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
        raise refusal("/saliency", error) from error
    saliency_map = explanation.saliency
    layers = sorted(explanation.per_layer or {})
    if layer and layer != "sum of all layers":
        if layer not in (explanation.per_layer or {}):
            raise refusal("/saliency", ValueError(f"Unknown layer {layer!r}; DF-CAM recorded {len(layers)} layers."))
        saliency_map = explanation.per_layer[layer]
    record = run.records[int(step) - 1]
    _decode(run.model_id, [record])
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
    except ValueError as error:
        raise refusal("/export", error) from error
    _decode(run.model_id, run.records)  # every step's pictures go into the archive
    archive = export.export_zip(run, session.file(f"{export.file_stem(run)}.zip"))
    gif = export.animation(run, session.file(f"{export.file_stem(run)}.gif"))
    return str(archive), str(gif)


def _on_model_change(model_id):
    """The chosen model's defaults and examples; the status line says at once if it cannot run here."""
    spec = config.model_spec(model_id)
    try:
        check_loadable(spec)
        status = gr.skip()
    except ValueError as error:
        status = f"⚠️ {error}"
    return spec.width, spec.height, spec.steps, spec.guidance, gr.update(samples=[[p] for p in spec.examples]), status


def _close_session(session: Session | None) -> None:
    if session is not None:
        session.close()


# ---------------------------------------------------------------- layout


def denoise_on_page(*inputs):
    """The Run button: ``denoise``'s updates, then the finished run opens the scrubber and fills
    the other tabs' choices (``after_run``'s outputs, which ``denoise``'s updates leave as they are)."""
    update = ()
    for update in denoise(*inputs):  # the step view, then the session
        yield *update, *[gr.skip()] * AFTER_RUN_OUTPUTS
    yield *[gr.skip()] * len(update), *after_run(update[-1])


STEP_OUTPUTS = ("pred_a", "noisy_a", "pred_b", "noisy_b", "status", "chart", "overlays")  # then the concept chart, the data
AFTER_RUN_OUTPUTS = 8


def serve_both(trigger, handler, inputs, outputs, api_name, notice, page_handler=None, page_outputs=None, **options):
    """Wire one action twice: ``trigger`` runs it for the page (private; refusals are shown on
    ``notice``, see ``on_page``), and a hidden twin serves ``handler`` as the named endpoint
    ``api_name`` with its own outputs, where refusals raise with their message."""
    page_outputs = page_outputs or outputs
    page_handler = page_handler or handler
    at = [i for i, output in enumerate(page_outputs) if output is notice]
    if at:
        page = on_page(page_handler, len(page_outputs), notice=at[0])
    else:
        page, page_outputs = on_page(page_handler, len(page_outputs)), page_outputs + [notice]
    trigger.click(page, inputs, page_outputs, api_name=f"page_{api_name}", api_visibility="private", **options)
    gr.Button(visible=False).click(handler, inputs, outputs, api_name=api_name, **options)


def build_demo() -> gr.Blocks:
    with XRayBlocks(title="Diffusion X-Ray", delete_cache=(3600, 3600)) as demo:
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
            export_notice = notice_line()
            with gr.Row():
                zip_file, gif_file = gr.File(label="Run (ZIP)"), gr.File(label="Animation (GIF)")
        with gr.Tab("About"):
            gr.Markdown(ABOUT)

        gpu = {"concurrency_limit": APP.max_concurrent_runs, "concurrency_id": "gpu"}
        settings = [d[n] for n in ("model_id", "prompt", "prompt_b", "negative", "seed", "steps", "guidance", "width", "height", "schedule", "lam", "custom")]
        step_outputs = [d[n] for n in STEP_OUTPUTS] + [k["chart"], d["data"]]
        after_run_outputs = [d["slider"], a["word"], a["step"], a["start"], a["end"], a["groups"], d["animation"], sal["step"]]
        assert len(after_run_outputs) == AFTER_RUN_OUTPUTS
        serve_both(d["run"], denoise, settings + [session], step_outputs + [session], "denoise", page_handler=denoise_on_page,
                   page_outputs=step_outputs + [session] + after_run_outputs, notice=d["status"], **gpu)
        d["slider"].release(on_page(show_step, len(step_outputs), notice=STEP_OUTPUTS.index("status")), [session, d["slider"]],
                            step_outputs, api_visibility="private")
        d["model_id"].change(_on_model_change, d["model_id"], [d["width"], d["height"], d["steps"], d["guidance"], d["examples"], d["status"]],
                             api_visibility="private")
        d["examples"].click(lambda sample: sample[0], d["examples"], d["prompt"], api_visibility="private")

        attention_inputs = [a[n] for n in ("word", "step", "aggregation", "start", "end", "groups", "view", "opacity", "include_special", "which")]
        serve_both(a["show"], attention, attention_inputs + [session], [a["overlay"], a["npy"], a["summary"]], "attention", notice=a["notice"])
        concept_outputs = [k["chart"], k["bars"], k["data"]]
        serve_both(k["refresh"], concepts, [session], concept_outputs, "concepts", notice=k["notice"])
        serve_both(k["relevance"], relevance, [k["rectify"], session], concept_outputs, "relevance", notice=k["notice"], **gpu)
        compare_inputs = [d[n] for n in ("model_id", "prompt", "negative", "seed", "steps", "guidance", "width", "height", "lam")]
        serve_both(k["compare"], compare_schedules, compare_inputs, k["grid"] + [k["compare_data"]], "compare_schedules",
                   notice=k["compare_notice"], **gpu)
        saliency_inputs = [sal[n] for n in ("method", "step", "masks", "keep", "mode", "mask_kind", "seed", "layer", "opacity",
                                            "score", "estimator", "rectify", "target", "weighting", "layer_scale")]
        serve_both(sal["explain"], saliency, saliency_inputs + [session], [sal["overlay"], sal["chart"], sal["npy"], sal["data"], sal["layer"]],
                   "saliency", notice=sal["notice"], **gpu)
        serve_both(export_button, export_run, [session], [zip_file, gif_file], "export", notice=export_notice)
    demo.queue(max_size=APP.max_queue, default_concurrency_limit=APP.max_concurrent_runs)
    _poll_queue_less(demo)
    return demo


def _poll_queue_less(demo: gr.Blocks) -> None:
    """Let Gradio's queue look for new events every ``APP.queue_poll_s`` instead of every 1 ms,
    and for progress every ``APP.progress_poll_s`` (Gradio 6 has no public setting for either;
    a test checks that they reach the queue's loops)."""
    queue = demo._queue
    queue.sleep_when_free = max(queue.sleep_when_free, APP.queue_poll_s)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, APP.progress_poll_s)


demo = build_demo()


def serve() -> None:
    """Start the server as ``python app.py`` does."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    share_cpu_cores(APP.max_concurrent_runs)  # a CPU server: each concurrent run gets its cores
    demo.launch(allowed_paths=[str(OUTPUT_ROOT)])


if __name__ == "__main__":
    serve()

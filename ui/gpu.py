"""The app's GPU work: every ``@spaces.GPU`` function beside the duration it asks ZeroGPU for (from
the work, never a constant), and the models loaded at startup. Outside a Space the decorator
leaves the functions as they are; on ZeroGPU each call runs in a forked worker, so what crosses
into and out of it pickles."""

from __future__ import annotations

import inspect

import spaces

from explainer import config, metrics
from explainer.cost import step_cost
from explainer.families import family
from explainer.methods import METHODS, ConceptAttention, DFLime, DFRise, SpotAttention, TokenRelevance, relevance_series
from explainer.models import load_model, preferred_device, preload
from explainer.image_mode import ImageRun
from explainer.run import RunData, RunSettings, StepRecord, attach_views, stream_instrumented, stream_runs, undecoded, view_latents

from . import settings
from .settings import gpu_duration, work_seconds

INSERTION_BATCH = inspect.signature(metrics.insertion_deletion).parameters["batch_size"].default  # states per call


def on_gpu() -> bool:
    """Whether this machine runs the models on a GPU."""
    return preferred_device()[0].type == "cuda"


def queue() -> dict:
    """The event options of every action that runs a model: one concurrency limit, shared."""
    return {"concurrency_limit": settings.APP.max_concurrent_runs, "concurrency_id": "gpu"}


def models_to_preload(zero_gpu: bool) -> list[str]:
    """On ZeroGPU, the Hub models marked ``preload`` load at startup in the main process (see
    ``models.preload``); the others, and every model elsewhere, load when first asked for."""
    return [spec.id for spec in config.MODELS.values() if spec.hub and spec.preload] if zero_gpu else []


def preload_models() -> None:
    zero_gpu = spaces.config.Config.zero_gpu
    for model_id, why in preload(models_to_preload(zero_gpu)).items():
        print(f"{model_id} did not load at startup (it will be tried again when asked for): {why}")
    if zero_gpu:  # count the Hub models' work now (seconds each), not in a visitor's first request
        settings.sustained_tflops()
        for spec in config.MODELS.values():
            if spec.hub:
                step_cost(spec.id)


def halves(spec: config.ModelSpec, guidance: float) -> int:
    """Denoiser evaluations per image and call: 2 where the run is guided (an unconditional half), else 1."""
    return 2 if family(spec.family).guided(guidance) else 1


def decoded_views(steps: int, every: int) -> int:
    """The VAE decodes of a run that decodes both views every ``every`` steps and at the last."""
    return 2 * (-(-steps // every) if every else 1)


RUN_ADVICE = "Ask for fewer steps or a smaller picture."


def run_seconds(spec: config.ModelSpec, settings_dict: dict, calls_per_step: int = 1, encodes: int = 0) -> float:
    s = settings_dict
    calls = s["steps"] * calls_per_step
    decodes = decoded_views(s["steps"], s.get("vae_decode_every", spec.vae_decode_every)) + encodes
    return work_seconds(spec, s["width"], s["height"], calls * halves(spec, s.get("guidance", spec.guidance)), calls, decodes)


def run_duration(model_id, settings_dicts) -> int:
    spec = config.model_spec(model_id)
    return gpu_duration(sum(run_seconds(spec, s) for s in settings_dicts), RUN_ADVICE)


def run_here(model_id: str, settings_dicts: list[dict]):
    """A run in this process, on whatever device the model is on: yields CPU objects (see ``stream_runs``)."""
    yield from stream_runs(load_model(model_id), [RunSettings.from_dict(s) for s in settings_dicts])


run_on_device = spaces.GPU(duration=run_duration)(run_here)
run_on_device.__doc__ = "The only GPU work of a run (``run_here`` on the Space's GPU)."


def image_run_duration(model_id, settings_dict, picture, mode) -> int:
    calls_per_step = 2 + config.LIMITS.inversion_refinements if mode == "invert" else 1  # invert, then denoise
    return gpu_duration(run_seconds(config.model_spec(model_id), settings_dict, calls_per_step, encodes=1), RUN_ADVICE)


@spaces.GPU(duration=image_run_duration)
def image_run_on_device(model_id: str, settings_dict: dict, picture, mode: str):
    """An image run (``ImageRun``: ``picture`` noised at every step, or inverted and denoised): yields
    CPU objects as ``run_here`` does."""
    yield from stream_instrumented([ImageRun(load_model(model_id), RunSettings.from_dict(settings_dict), picture, mode)])


def relevance_duration(model_id, run, *_rectify) -> int:  # the rectifier does not change the work
    spec, steps = config.model_spec(model_id), len(run.records)
    per_call = halves(spec, run.settings.guidance)  # a backward pass costs about two forward ones
    seconds = work_seconds(spec, run.settings.width, run.settings.height, 3 * steps * per_call, 2 * steps)
    return gpu_duration(seconds, "Explain a run with fewer steps or a smaller picture.")


@spaces.GPU(duration=relevance_duration)
def relevance_on_device(model_id: str, run: RunData, rectify: str = TokenRelevance.rectify) -> dict:
    """Token relevance of every word at every step of ``run`` (see ``relevance_series``)."""
    return relevance_series(load_model(model_id), run, method=TokenRelevance(rectify=rectify))


def explain_duration(model_id, run, name, options, step, score) -> int:
    spec = config.model_spec(model_id)
    perturbed = {"df-rise": options.get("n_masks", DFRise.n_masks), "df-lime": options.get("n_samples", DFLime.n_samples)}
    batch = options.get("batch_size", DFRise.batch_size)
    if name in perturbed:
        images, calls = perturbed[name], -(-perturbed[name] // batch)
    else:
        images, calls = (3, 2) if name == "df-cam" else (1, 1)  # DF-CAM: a forward and a backward pass
    images, calls, decodes = images + 1, calls + 1, 0  # + the step's own prediction
    if score:  # insertion and deletion: every state predicted and decoded, and the real next step decoded
        states = 2 * (run.latent_size[0] + 1)
        images, calls, decodes = images + states, calls + -(-states // INSERTION_BATCH), states + 1
    seconds = work_seconds(spec, run.settings.width, run.settings.height, images * halves(spec, run.settings.guidance), calls, decodes)
    return gpu_duration(seconds, "Ask for fewer masks or samples, leave out the insertion/deletion score, "
                                 "or explain a run of a smaller picture.")


@spaces.GPU(duration=explain_duration)
def explain_on_device(model_id, run: RunData, name: str, options: dict, step: int, score: bool):
    """The GPU work of the Saliency tab: one explanation, and its insertion/deletion scores."""
    model = load_model(model_id)
    explanation = METHODS[name](**options).explain(model, run, step)
    scores = metrics.insertion_deletion(model, run, step, explanation.saliency) if score else None
    return explanation, scores


def spot_duration(model_id, run, step, row, column) -> int:
    spec = config.model_spec(model_id)  # one call, its attention redone
    seconds = work_seconds(spec, run.settings.width, run.settings.height, halves(spec, run.settings.guidance), 1)
    return gpu_duration(seconds, "Explain a run of a smaller picture.")


@spaces.GPU(duration=spot_duration)
def spot_on_device(model_id, run: RunData, step: int, row: int, column: int):
    """The region view's work: where one spot looks at a step (``SpotAttention``)."""
    return SpotAttention(row=row, column=column).explain(load_model(model_id), run, step)


@spaces.GPU(duration=spot_duration)
def concept_maps_on_device(model_id, run: RunData, step: int, concepts: tuple[str, ...], blocks: str):
    """ConceptAttention's maps of ``concepts`` at a step (one denoiser call, as the region view's)."""
    return ConceptAttention(concepts=concepts, blocks=blocks).explain(load_model(model_id), run, step)


def decode_duration(model_id, latents) -> int:
    spec = config.model_spec(model_id)
    height, width = (side * step_cost(model_id).scale for side in latents[0].shape[-2:])
    return gpu_duration(work_seconds(spec, width, height, 0, 0, len(latents)), "Show fewer steps at once.")


@spaces.GPU(duration=decode_duration)
def decode_on_device(model_id: str, latents: list) -> list:
    """VAE-decode latents into pictures (the views of steps the run did not decode)."""
    return load_model(model_id).decode_in_batches(latents)


def decode(model_id: str, records: list[StepRecord]) -> None:
    """Give the records the VAE views the run left out, in place; a no-op for decoded ones."""
    missing = undecoded(records)
    if missing:
        attach_views(missing, decode_on_device(model_id, view_latents(missing)))

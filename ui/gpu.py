"""The app's GPU work: every ``@spaces.GPU`` function beside the duration it asks ZeroGPU for (from
the work, never a constant), and the models loaded at startup. Outside a Space the decorator
leaves the functions as they are; on ZeroGPU each call runs in a forked worker, so what crosses
into and out of it pickles."""

from __future__ import annotations

import spaces

from explainer import config, metrics
from explainer.methods import METHODS, ConceptAttention, DFLime, DFRise, SpotAttention, TokenRelevance, relevance_series
from explainer.models import load_model, preferred_device, preload
from explainer.image_mode import ImageRun
from explainer.run import RunData, RunSettings, StepRecord, attach_views, stream_instrumented, stream_runs, undecoded, view_latents

from . import settings
from .settings import gpu_seconds


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
    for model_id, why in preload(models_to_preload(spaces.config.Config.zero_gpu)).items():
        print(f"{model_id} did not load at startup (it will be tried again when asked for): {why}")


def run_duration(model_id, settings_dicts) -> int:
    spec = config.model_spec(model_id)
    return sum(gpu_seconds(spec, s["steps"], s["width"], s["height"]) for s in settings_dicts)


def run_here(model_id: str, settings_dicts: list[dict]):
    """A run in this process, on whatever device the model is on: yields CPU objects (see ``stream_runs``)."""
    yield from stream_runs(load_model(model_id), [RunSettings.from_dict(s) for s in settings_dicts])


run_on_device = spaces.GPU(duration=run_duration)(run_here)
run_on_device.__doc__ = "The only GPU work of a run (``run_here`` on the Space's GPU)."


def image_run_duration(model_id, settings_dict, picture, mode) -> int:
    steps = settings_dict["steps"]
    calls = steps * (2 + config.LIMITS.inversion_refinements) if mode == "invert" else steps  # invert, then denoise
    return gpu_seconds(config.model_spec(model_id), calls, settings_dict["width"], settings_dict["height"])


@spaces.GPU(duration=image_run_duration)
def image_run_on_device(model_id: str, settings_dict: dict, picture, mode: str):
    """An image run (``ImageRun``: ``picture`` noised at every step, or inverted and denoised): yields
    CPU objects as ``run_here`` does."""
    yield from stream_instrumented([ImageRun(load_model(model_id), RunSettings.from_dict(settings_dict), picture, mode)])


def relevance_duration(model_id, run, *_rectify) -> int:  # the rectifier does not change the work
    spec = config.model_spec(model_id)
    return gpu_seconds(spec, 3 * len(run.records), run.settings.width, run.settings.height)  # fwd + bwd per step


@spaces.GPU(duration=relevance_duration)
def relevance_on_device(model_id: str, run: RunData, rectify: str = TokenRelevance.rectify) -> dict:
    """Token relevance of every word at every step of ``run`` (see ``relevance_series``)."""
    return relevance_series(load_model(model_id), run, method=TokenRelevance(rectify=rectify))


def explain_duration(model_id, run, name, options, step, score) -> int:
    spec = config.model_spec(model_id)
    perturbed = {"df-rise": options.get("n_masks", DFRise.n_masks), "df-lime": options.get("n_samples", DFLime.n_samples)}
    batch = options.get("batch_size", DFRise.batch_size)
    calls = -(-perturbed[name] // batch) if name in perturbed else 3 if name == "df-cam" else 0  # DF-CAM: forward and backward
    calls += 2 * (run.latent_size[0] + 1) / 8 if score else 0
    return gpu_seconds(spec, int(calls) + 1, run.settings.width, run.settings.height)


@spaces.GPU(duration=explain_duration)
def explain_on_device(model_id, run: RunData, name: str, options: dict, step: int, score: bool):
    """The GPU work of the Saliency tab: one explanation, and its insertion/deletion scores."""
    model = load_model(model_id)
    explanation = METHODS[name](**options).explain(model, run, step)
    scores = metrics.insertion_deletion(model, run, step, explanation.saliency) if score else None
    return explanation, scores


def spot_duration(model_id, run, step, row, column) -> int:
    return gpu_seconds(config.model_spec(model_id), 2, run.settings.width, run.settings.height)  # one call, attention redone


@spaces.GPU(duration=spot_duration)
def spot_on_device(model_id, run: RunData, step: int, row: int, column: int):
    """The region view's work: where one spot looks at a step (``SpotAttention``)."""
    return SpotAttention(row=row, column=column).explain(load_model(model_id), run, step)


@spaces.GPU(duration=spot_duration)
def concept_maps_on_device(model_id, run: RunData, step: int, concepts: tuple[str, ...], blocks: str):
    """ConceptAttention's maps of ``concepts`` at a step (one denoiser call, as the region view's)."""
    return ConceptAttention(concepts=concepts, blocks=blocks).explain(load_model(model_id), run, step)


def decode_duration(model_id, latents) -> int:
    spec = config.model_spec(model_id)  # a decode costs about a step at the model's own size
    return gpu_seconds(spec, len(latents), spec.width, spec.height)


@spaces.GPU(duration=decode_duration)
def decode_on_device(model_id: str, latents: list) -> list:
    """VAE-decode latents into pictures (the views of steps the run did not decode)."""
    return load_model(model_id).decode_in_batches(latents)


def decode(model_id: str, records: list[StepRecord]) -> None:
    """Give the records the VAE views the run left out, in place; a no-op for decoded ones."""
    missing = undecoded(records)
    if missing:
        attach_views(missing, decode_on_device(model_id, view_latents(missing)))

"""The instrumented denoising run: one record per step, yielded as soon as the step is done.

The loop is written out like ``StableDiffusionPipeline.__call__`` (encode prompt, timesteps,
latents, then per step: expand for guidance, denoise, guide, scheduler step), built from the
pipeline's public pieces and never patching it. Writing it out, rather than driving the
pipeline's ``callback_on_step_end``, is what gives us ``x0_hat``, both guidance halves and a
per-run attention recorder without touching the pipeline's own state, so runs can share it.

Example:
    >>> run = InstrumentedRun(load_model(), RunSettings(prompt="a red circle on the left"))
    >>> for record in run.steps():
    ...     print(record.index, record.timestep, record.attention.shape)
"""

from __future__ import annotations

import dataclasses
import math
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import config
from .capture import capture_attention
from .recorder import AttentionRecorder
from .models import LoadedModel, refusing_out_of_memory
from .replay import combine_guidance, model_input
from .schedules import timesteps as schedule_timesteps
from .tokens import PromptTokens


@dataclass
class RunSettings:
    """Everything that defines a run; round-trips to JSON with ``to_dict``/``from_dict``.

    ``seed=-1`` means a random seed; the run reports the seed it used. ``schedule`` is
    "uniform", "early", "latter" or an explicit list of timesteps (docs/methods.md, Schedules).
    """

    prompt: str
    negative_prompt: str = config.DEFAULTS.negative_prompt
    seed: int = config.DEFAULTS.seed
    steps: int = 20
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    schedule: str | list[int] = config.DEFAULTS.schedule
    concentration: float = config.DEFAULTS.concentration
    scheduler: str = config.DEFAULTS.scheduler
    per_group: bool = False  # also keep each layer group's maps (block and resolution; docs/methods.md, Cross-attention maps)
    vae_decode_every: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunSettings:
        """Settings from ``to_dict``'s output; an export made before 2026-11-30 names the concentration "lam"."""
        data = {"concentration": data["lam"], **data} if "lam" in data else data
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def validated(self, limits: config.Limits = config.LIMITS) -> RunSettings:
        """A copy with a concrete seed; ValueError naming the argument for anything out of range."""
        prompt = self.prompt if isinstance(self.prompt, str) else ""
        if not prompt.strip():
            raise ValueError("prompt is empty: type what the image should show.")
        if len(prompt) > limits.max_prompt_chars:
            raise ValueError(f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}.")
        check_int("steps", self.steps, 1, limits.max_steps)
        for name in ("width", "height"):
            value = getattr(self, name)
            check_int(name, value, limits.min_side, limits.max_side)
            if value % limits.side_multiple:
                raise ValueError(f"{name} must be a multiple of {limits.side_multiple}, got {value}.")
        check_number("guidance", self.guidance, 0.0, limits.max_guidance)
        check_number("concentration", self.concentration, 0.0, limits.max_concentration)
        check_int("vae_decode_every", self.vae_decode_every, 0, limits.max_steps)
        if self.scheduler not in config.SCHEDULERS:
            raise ValueError(f"scheduler must be one of {config.SCHEDULERS}, got {self.scheduler!r}.")
        seed = self.seed
        if seed == -1:
            seed = random.SystemRandom().randrange(2**31)
        check_int("seed", seed, 0, limits.max_seed, hint=" (-1 means random)")
        schedule = self.schedule if isinstance(self.schedule, str) else list(self.schedule)
        schedule_timesteps(schedule, self.steps, self.concentration)  # raises on a bad schedule
        if not isinstance(schedule, str):
            steps = len(schedule)
            check_int("number of explicit timesteps", steps, 1, limits.max_steps)
        else:
            steps = self.steps
        return dataclasses.replace(self, prompt=prompt, seed=seed, schedule=schedule, steps=steps)

RUN_ADVICE = "Generate a smaller picture, or fewer runs at once."


def check_int(name: str, value, low: int, high: int | float, hint: str = "") -> None:
    """ValueError naming the argument, the rule and the value, unless ``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{hint}, got {value!r}.")


def check_number(name: str, value, low: float, high: float, open_low: bool = False) -> None:
    """ValueError unless ``value`` is a finite number in [low, high] (or (low, high] with ``open_low``)."""
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if open_low else low <= value) or value > high:
        interval = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}.")


@dataclass
class StepRecord:
    """What the model did at step ``index`` (1-based) of ``total``: from ``x_t`` to ``x_{t-1}``.

    ``timestep`` is what the denoiser saw: an int for DDPM families, a float (1000 sigma) for flow
    matching. Latents are CPU tensors (1, C, h, w) in the denoiser's scale and the run's dtype
    (float32 on a CPU, the model's half precision on a GPU); a step's ``latents`` is the previous
    step's ``next_latents`` object. ``attention`` is float16 (P + 1, h, w) on the grid of the model's
    finest attention layer (the latent grid in a UNet, the token grid H_lat / patch in an MM-DiT):
    rows 0..P-1 are token positions 0 (start) to the end token, the last row is all padding
    positions summed; rows sum to 1 at every cell. ``group_attention`` holds each layer group's mean
    map (same rows) at the group's own resolution, at most ``LIMITS.max_group_map_side`` a side,
    when the run asked for them (``RunData.attention_groups`` names each group's layers).
    ``text_share`` (joint attention only, float16 (h, w) on the same grid, in [0, 1]): the part of
    each image token's attention that went to the text, averaged over heads and layers.
    """

    index: int
    total: int
    timestep: int | float
    next_timestep: int | float | None  # None: the last step, which lands on the clean latent
    alpha_bar: float  # x0's squared coefficient in x_t
    sigma: float  # the family's noise level: sqrt((1 - alpha_bar) / alpha_bar) (DDPM), sigma of (1 - sigma) x0 + sigma eps (flow)
    latents: torch.Tensor
    next_latents: torch.Tensor
    x0_hat: torch.Tensor
    noise_pred: torch.Tensor  # guided eps_hat (in the scheduler's prediction type)
    image_size: tuple[int, int]  # (width, height) of the generated image
    preview_noisy: Image.Image  # fast linear previews, at the latent's size
    preview_prediction: Image.Image
    attention: np.ndarray
    noisy_view: Image.Image | None = None
    prediction_view: Image.Image | None = None
    group_attention: dict[str, np.ndarray] = field(default_factory=dict)
    text_share: np.ndarray | None = None

    @property
    def label(self) -> str:
        return f"step {self.index} of {self.total}, t = {self.timestep:.4g}"


@dataclass
class RunData:
    """What a run produced, on the CPU only: safe to keep in a session, pickle or export.

    ``records`` fills up step by step; ``final_*`` and ``reproduction`` are set at the end.
    """

    settings: RunSettings
    model_id: str
    tokens: PromptTokens
    timesteps: list[int | float]  # as the denoiser sees them (ints: DDPM; floats, 1000 sigma: flow matching)
    noise_levels: list[float]  # the family's sigma at every timestep, known before the run starts
    latent_size: tuple[int, int]
    messages: list[str] = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)
    attention_groups: dict[str, list[str]] = field(default_factory=dict)  # "up 16×16" -> layer keys
    final_array: np.ndarray | None = None  # (H, W, 3) float in [0, 1], as pipe(output_type="np")
    final_image: Image.Image | None = None
    reproduction: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # an image run's: {"mode", "sha256", ...} (``image_mode``); empty for a generation
    source_image: Image.Image | None = None  # the image an image run explains, at the run's size

    @property
    def done(self) -> bool:
        return self.final_image is not None

    def for_computing(self) -> RunData:
        """A shallow copy without what no method reads: the per-group maps and the decoded views
        of every step, and the final image. ZeroGPU pickles a GPU call's arguments into its
        worker process; at SD size these are most of a run's bytes (per-group maps 9 KB per
        prompt token per step, views 1.5 MB every fifth step, the final image 3.8 MB)."""
        records = [dataclasses.replace(r, group_attention={}, noisy_view=None, prediction_view=None) for r in self.records]
        return dataclasses.replace(self, records=records, final_array=None, final_image=None, source_image=None)


class InstrumentedRun:
    """One run of a model with one set of settings; ``steps()`` generates its records.

    All state of the run (scheduler, generator, attention recorder, records) lives in this
    object: runs on one shared pipeline in several threads do not interfere. What it produced
    is in ``self.data`` (CPU objects only).
    """

    def __init__(self, model: LoadedModel, settings: RunSettings):
        self.model = model
        self.settings = settings.validated()
        self.scheduler = model.family.scheduler(model.pipe, self.settings)
        self._last_next_latents = None  # the previous step's x_{t-1} on the model's device
        tokens = model.tokenize(self.settings.prompt)
        timesteps = [t.item() for t in self.scheduler.timesteps]
        self.data = RunData(
            settings=self.settings,
            model_id=model.id,
            tokens=tokens,
            timesteps=timesteps,
            noise_levels=[model.family.noise_levels(self.scheduler, t)[1] for t in timesteps],
            latent_size=model.family.latent_size(model.pipe, self.settings.width, self.settings.height),
            messages=[m for m in (tokens.truncation_message,) if m],
        )

    @property
    def guided(self) -> bool:
        """Whether the run predicts an unconditional half beside the prompt's (``Family.guided``)."""
        return self.model.family.guided(self.settings.guidance)

    def steps(self) -> Iterator[StepRecord]:
        """Run the denoising loop, yielding a ``StepRecord`` after every step."""
        model, settings = self.model, self.settings
        with torch.inference_mode():
            conditioning = model.encode(settings.prompt, settings.negative_prompt, self.guided, guidance=settings.guidance)
            latents = self.initial_latents(conditioning)
        recorder = AttentionRecorder(
            model.family,
            self.data.latent_size,
            kept_positions=self.data.tokens.stored_positions,
            conditional_index=1 if self.guided else 0,
            batch_size=2 if self.guided else 1,
            per_group=settings.per_group,
            sites=model.family.cross_attention_sites(model.denoiser),
        )
        self.data.attention_groups = recorder.groups  # filled by the first step

        def refusing(what: str):
            return refusing_out_of_memory(f"{what} of a {settings.width}×{settings.height} run on {model.id}", RUN_ADVICE)

        with capture_attention(model):
            for index, timestep in enumerate(self.scheduler.timesteps):
                with torch.inference_mode(), refusing(f"Step {index + 1}"):
                    latents = self.latents_at(timestep, latents)
                    noise_pred = self._denoise(latents, timestep, conditioning, recorder)
                    # deterministic: DDIM's eta defaults to 0; no solver used here draws noise
                    next_latents = self.scheduler.step(noise_pred, timestep, latents).prev_sample
                with refusing(f"Recording step {index + 1}"):
                    record = self._record(index, timestep.item(), latents, next_latents, noise_pred, recorder)
                self.data.records.append(record)
                latents = self._last_next_latents = next_latents
                yield record
        with torch.inference_mode(), refusing("Decoding the last step"):
            final = model.decode(latents, output_type="np")[0]
        self.data.final_array = final
        self.data.final_image = Image.fromarray((final * 255).round().astype(np.uint8))
        self.data.reproduction = self.reproduction()

    def initial_latents(self, conditioning) -> torch.Tensor:
        """x_T, where the loop starts: noise drawn from the run's seed (scaled for schedulers that ask)."""
        model = self.model
        generator = torch.Generator("cpu").manual_seed(self.settings.seed)
        shape = (1, model.family.latent_channels(model.pipe), *self.data.latent_size)
        latents = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching starts at the noise

    def latents_at(self, timestep, latents: torch.Tensor) -> torch.Tensor:
        """x_t the step at ``timestep`` starts from, given the previous step's x_{t-1} (``latents``): that
        itself in a denoising run; an image run may start each step elsewhere (``image_mode``)."""
        return latents

    def run_all(self) -> InstrumentedRun:
        """Run to the end without streaming; returns self."""
        for _ in self.steps():
            pass
        return self

    def _denoise(self, latents, timestep, conditioning, recorder) -> torch.Tensor:
        latent_input = model_input(self.scheduler, latents, timestep, conditioning.halves)
        output = self.model.family.predict(self.model.pipe, latent_input, timestep, conditioning, recorder=recorder)
        return combine_guidance(output, self.settings.guidance, conditioning.halves)

    def _record(self, index, timestep, latents, next_latents, noise_pred, recorder) -> StepRecord:
        text_share = recorder.text_share()
        attention, groups = recorder.finish_step()
        alpha_bar, sigma = self.model.family.noise_levels(self.scheduler, timestep)
        x0_hat = self.model.family.clean_estimate(self.scheduler, latents, noise_pred, timestep)
        total = len(self.data.timesteps)
        size = (self.settings.width, self.settings.height)
        record = StepRecord(
            index=index + 1,
            total=total,
            timestep=timestep,
            next_timestep=self.data.timesteps[index + 1] if index + 1 < total else None,
            alpha_bar=alpha_bar,
            sigma=sigma,
            # in the run's own dtype (what the model computed; half the bytes on a GPU), each step's x_t
            # the previous step's stored x_{t-1} itself, not a copy
            latents=self._stored(latents),
            next_latents=next_latents.cpu(),
            x0_hat=x0_hat.to(latents.dtype).cpu(),
            noise_pred=noise_pred.cpu(),
            image_size=size,
            preview_noisy=self.model.preview(latents),
            preview_prediction=self.model.preview(x0_hat),
            attention=attention,
            group_attention=groups,
            text_share=text_share,
        )
        every = self.settings.vae_decode_every
        if (every and (index + 1) % every == 0) or index + 1 == total:
            decode_views(self.model, [record])
        return record

    def _stored(self, latents: torch.Tensor) -> torch.Tensor:
        """x_t as a record keeps it: the previous record's x_{t-1} object where the step started there."""
        if self.data.records and self._last_next_latents is latents:
            return self.data.records[-1].next_latents
        return latents.cpu()

    def reproduction(self) -> dict:
        """Everything needed to run this again: settings, model, scheduler, versions, device."""
        import diffusers
        import transformers

        settings = self.settings.to_dict()
        settings["timesteps"] = self.data.timesteps
        return {
            "settings": settings,
            "model_id": self.model.id,
            "model_source": self._model_source(),
            "scheduler": {"class": type(self.scheduler).__name__, "config": dict(self.scheduler.config)},
            "tokens": self.data.tokens.to_dict(),
            "device": str(self.model.device),
            "dtype": str(self.model.dtype),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "numpy": np.__version__,
            },
            "messages": self.data.messages,
            **({"source": self.data.source} if self.data.source else {}),
        }

    def _model_source(self) -> str:
        """The Hub repo id, or the embedded model's folder relative to the repository (no server path)."""
        spec = self.model.spec
        if spec is None:
            return ""
        return spec.source if spec.hub else config.portable_path(spec.source)


def undecoded(records: list[StepRecord]) -> list[StepRecord]:
    """The records whose VAE views the run did not decode (it decodes every ``vae_decode_every`` steps)."""
    return [record for record in records if record.noisy_view is None or record.prediction_view is None]


def view_latents(records: list[StepRecord]) -> list[torch.Tensor]:
    """What decodes into the records' views: x_t and x0_hat of each record, in that order."""
    return [latent for record in records for latent in (record.latents, record.x0_hat)]


def attach_views(records: list[StepRecord], pictures: list[Image.Image]) -> None:
    """Give each record its decoded views, ``pictures`` being the decode of ``view_latents(records)``."""
    for record, noisy, prediction in zip(records, pictures[0::2], pictures[1::2], strict=True):
        record.noisy_view, record.prediction_view = noisy, prediction


def decode_views(model: LoadedModel, records: list[StepRecord]) -> None:
    """VAE-decode the views of the records that lack them, in place (scrubbing or exporting a step
    the run did not decode)."""
    missing = undecoded(records)
    if missing:
        attach_views(missing, model.decode_in_batches(view_latents(missing)))


def stream_runs(model: LoadedModel, settings: list[RunSettings]) -> Iterator[tuple[str, int, RunData | StepRecord]]:
    """Run several settings side by side (e.g. two prompts from the same noise), step by step.

    Yields ``("start", i, RunData)`` for every run first, then ``("step", i, StepRecord)`` with the
    runs' steps interleaved (step k of every run before step k + 1), then ``("end", i, RunData)``.
    Only CPU objects cross this boundary, so it can run in a GPU worker process (ZeroGPU).
    """
    yield from stream_instrumented([InstrumentedRun(model, one) for one in settings])  # all validated before any work


def stream_instrumented(runs: list[InstrumentedRun]) -> Iterator[tuple[str, int, RunData | StepRecord]]:
    """``stream_runs`` for runs already made (an image run, say): the same items in the same order."""
    for index, run in enumerate(runs):
        yield "start", index, dataclasses.replace(run.data, records=[])
    generators = [run.steps() for run in runs]
    active = list(range(len(runs)))
    try:
        while active:
            for index in list(active):
                record = next(generators[index], None)
                if record is None:
                    active.remove(index)
                else:
                    yield "step", index, record
    finally:  # a cancelled stream closes every run now, restoring the attention processors
        for generator in generators:
            generator.close()
    for index, run in enumerate(runs):
        yield "end", index, dataclasses.replace(run.data, records=[])

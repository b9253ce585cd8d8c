"""Loading the models the config allows: one pipeline per id per process.

CUDA with float16 where a GPU is present (or the model's ``ModelSpec.gpu_dtype``: bfloat16 for
FLUX.1), else CPU with float32. Only ids in ``config.MODELS`` load; ``trust_remote_code`` is never
passed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from . import config
from .families import Conditioning, Family
from .families import family as family_named
from .tokens import PromptTokens

# A fast (Rust) tokenizer keeps its padding and truncation settings as state that every call
# rewrites: two threads tokenizing at once can swap settings, and a prompt padded to 77 tokens
# comes back unpadded (8 tokens), so a run silently gets other text embeddings. Every use of
# a shared tokenizer goes through its lock (LoadedModel.encode / .tokenize), every tokenizer of
# the pipeline (SD 3 has three) taken in one global order.
_TOKENIZER_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZER_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.Lock:
    """The one lock of this tokenizer object (shared by every pipeline that holds it)."""
    with _TOKENIZER_LOCKS_GUARD:
        return _TOKENIZER_LOCKS.setdefault(tokenizer, threading.Lock())


@contextmanager
def tokenizers_locked(pipe) -> Iterator[None]:
    """Hold the lock of every tokenizer of ``pipe`` (components named ``tokenizer*``), each once,
    taken in the order of the objects' ids so that two pipelines sharing tokenizers cannot deadlock."""
    tokenizers = {id(t): t for name, t in pipe.components.items() if name.startswith("tokenizer") and t is not None}
    with ExitStack() as stack:
        for key in sorted(tokenizers):
            stack.enter_context(tokenizer_lock(tokenizers[key]))
        yield


@dataclass
class LoadedModel:
    """A pipeline with what the explainer needs to know about it: its family's adapter, and the
    fast preview's colour map."""

    id: str
    pipe: DiffusionPipeline
    latent_rgb: np.ndarray  # (C [+1]) x 3 fast-preview map
    spec: config.ModelSpec | None = None
    family: Family = field(default_factory=lambda: family_named("sd1"))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.family.denoiser(self.pipe)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def preview(self, latents: torch.Tensor) -> Image.Image:
        """Fast RGB preview of one latent (1, C, h, w) in the denoiser's scale, at the latent's own size
        (w x h), by the linear map ``latent_rgb``: kept small, enlarging adds no information."""
        latent = latents[0].float().cpu().numpy()  # (C, h, w)
        channels = latent.shape[0]
        rgb = np.einsum("chw,cd->hwd", latent, self.latent_rgb[:channels])
        if len(self.latent_rgb) > channels:  # the bias row
            rgb = rgb + self.latent_rgb[channels]
        return Image.fromarray(((rgb.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8))

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """Decode latents (B, C, h, w) in the denoiser's scale as the pipeline does: PIL pictures, or
        with ``output_type="np"`` a float array (B, H, W, 3) in [0, 1]."""
        return self.family.decode(self.pipe, latents, output_type)

    def decode_in_batches(self, latents: list[torch.Tensor], batch_size: int = 8) -> list[Image.Image]:
        """Decode many latents (each (1, C, h, w)), ``batch_size`` at a time (bounded memory at SD size)."""
        pictures: list[Image.Image] = []
        for start in range(0, len(latents), batch_size):
            pictures += self.decode(torch.cat(latents[start : start + batch_size]))
        return pictures

    def encode(self, prompt: str, negative_prompt: str = "", guided: bool = True, guidance: float | None = None) -> Conditioning:
        """The prompt's conditioning, in diffusers' batch order under guidance: [unconditional, conditional];
        with ``guidance``, the guidance scale added as an input where the model takes one
        (``Family.with_guidance``: FLUX.1-dev's embedding)."""
        length = self.max_sequence_length
        with tokenizers_locked(self.pipe):
            conditioning = self.family.encode(self.pipe, prompt, negative_prompt, guided, max_sequence_length=length)
        return conditioning if guidance is None else self.family.with_guidance(self.pipe, conditioning, guidance)

    def tokenize(self, prompt: str) -> PromptTokens:
        """The prompt's tokens and words (see ``Family.tokenize``), safe beside other threads."""
        with tokenizers_locked(self.pipe):
            return self.family.tokenize(self.pipe, prompt, max_sequence_length=self.max_sequence_length)

    @property
    def max_sequence_length(self) -> int | None:
        """The T5 tokens the spec asks for (``ModelSpec.max_sequence_length``); None: the pipeline's default."""
        return self.spec.max_sequence_length if self.spec is not None else None

    def check_prompt(self, prompt: str) -> None:
        """For a closed-vocabulary model, a ValueError naming the words it does not know."""
        if self.spec is None or not self.spec.closed_vocabulary:
            return
        vocabulary = self.family.vocabulary(self.pipe)
        words = re.findall(r"[^\s,.;:!?]+", prompt.lower())
        unknown = sorted({w for w in words if w not in vocabulary})
        if unknown:
            known = sorted(w for w in vocabulary if w.isalpha() and len(w) > 1)
            raise ValueError(
                f"Words not in the {self.id} model's vocabulary: {', '.join(map(repr, unknown))}. "
                f"It knows: {', '.join(known)}."
            )

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline, model_id: str = "custom", spec=None, family: str = "sd1") -> LoadedModel:
        """Wrap a pipeline built elsewhere (tests, notebooks); ``spec``'s family wins over ``family``."""
        adapter = family_named(spec.family if spec is not None else family)
        if spec is not None and spec.latent_rgb is not None:
            factors = np.asarray(spec.latent_rgb, dtype=np.float32)
        else:
            factors = adapter.fit_preview(pipe)
        pipe.set_progress_bar_config(disable=True)
        return cls(id=model_id, pipe=pipe, latent_rgb=factors, spec=spec, family=adapter)

    def randomised(self, seed: int = 0) -> LoadedModel:
        """The same pipeline with the denoiser's weights re-initialised (seeded): the model randomisation
        test of Adebayo et al. (2018), where an explanation that does not change is not explaining.
        It keeps this model's spec (how it encodes prompts); its preview map is fitted again."""
        torch.manual_seed(seed)
        denoiser = type(self.denoiser).from_config(self.denoiser.config).eval()
        pipe = self.family.rebuilt(self.pipe, denoiser)
        randomised = LoadedModel.from_pipeline(pipe, model_id=self.id + "-randomised", family=self.family.name)
        return dataclasses.replace(randomised, spec=self.spec)


class OutOfDeviceMemory(ValueError):
    """What was asked does not fit the accelerator's memory; the message says what to ask instead. A
    ValueError, so the app shows it as it shows any refusal and keeps serving."""


@contextmanager
def refusing_out_of_memory(what: str, advice: str) -> Iterator[None]:
    """Turn the accelerator running out of memory while doing ``what`` into ``OutOfDeviceMemory``,
    after freeing the allocator's cache, so that the next request starts from a clean device."""
    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfDeviceMemory(f"{what} ran out of GPU memory. {advice}") from None


def memory_budget(device: torch.device, share: float) -> int | None:
    """``share`` of the accelerator memory free now, in bytes; None on a CPU (no budget is kept there)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * share)


def preferred_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def share_cpu_cores(concurrent_runs: int) -> int:
    """On a CPU, give each of ``concurrent_runs`` runs its share of the cores as PyTorch threads;
    returns the count set (nothing is changed on a GPU, where it returns 0).

    More threads only oversubscribe the cores when runs overlap (why, measured: docs/design.md,
    "Threads and cores on a CPU server").
    """
    if preferred_device()[0].type != "cpu":
        return 0
    threads = max(1, (os.cpu_count() or 1) // max(1, concurrent_runs))
    torch.set_num_threads(threads)
    return threads


_log = logging.getLogger(__name__)
_CACHE: dict[str, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(model_id: str | None = None) -> LoadedModel:
    """Load (once per process) the model ``model_id`` from the config; the default model when None.

    Raises:
        ValueError: the id is not in the config, or it needs the Hub while the Hub is offline,
            or the embedded weights are missing.
    """
    model_id = model_id or config.default_model_id()
    spec = config.model_spec(model_id)
    with _CACHE_LOCK:  # one load at a time: two users asking at once share one pipeline
        if model_id not in _CACHE:
            check_loadable(spec)
            try:
                pipe = _build_pipeline(spec)
            except Exception as error:  # weights missing or unreachable, out of memory: say so, keep the trace in the log
                _log.exception("loading %s failed", model_id)
                raise ValueError(f"{spec.label} could not be loaded here ({type(error).__name__}: {error}). "
                                 f"{_what_to_do_instead(spec)}") from error
            _CACHE[model_id] = LoadedModel.from_pipeline(pipe, model_id, spec)
        return _CACHE[model_id]


def check_loadable(spec: config.ModelSpec) -> None:
    """A ValueError saying why ``spec`` cannot load on this machine, and what to do instead."""
    if spec.needs_gpu and preferred_device()[0].type != "cuda":
        raise ValueError(f"{spec.label} needs a GPU, and this machine has none. {_what_to_do_instead(spec)}")
    if spec.hub and config.HUB_OFFLINE:
        raise ValueError(f"{spec.label} is downloaded from the Hugging Face Hub, which is switched off here "
                         f"(HF_HUB_OFFLINE=1). {_what_to_do_instead(spec)}")
    if config.weights_missing(spec):
        raise ValueError(f"{spec.label} has no weights in {config.portable_path(spec.source)} yet: train it first "
                         f"({spec.trained_by or 'its model card says how'}).")


def _what_to_do_instead(spec: config.ModelSpec) -> str:
    others = [s.label for s in config.MODELS.values() if not (s.hub or s.needs_gpu) and s.id != spec.id]
    where = f"choose {others[0]!r}, which runs on this machine, " if others else ""
    advice = f"To explain a model here, {where}or use {spec.label} where a GPU and the Hub are available (the Space)."
    if spec.gated:
        advice += (f" {spec.source} is gated on the Hugging Face Hub: loading it needs a Hugging Face token (HF_TOKEN) "
                   "of an account that has accepted its licence and been given access.")
    return advice


def preload(model_ids) -> dict[str, str]:
    """Load each model now; returns {id: why it did not load} for the ones that failed (they load
    again when first asked for, with the message then).

    On ZeroGPU the app calls this at startup for the Hub models: ZeroGPU runs every GPU call in
    a worker process forked from the main one and moves what the main process put "on cuda"
    into it at each start, while a model first loaded inside a GPU call lives only as long as
    that worker and is read from disk again, inside the GPU time, by the next one.
    """
    failures = {}
    for model_id in model_ids:
        try:
            load_model(model_id)
        except (ValueError, OSError) as error:
            failures[model_id] = str(error)
    return failures


def _build_pipeline(spec: config.ModelSpec):
    device, dtype = preferred_device()
    if device.type == "cuda":
        dtype = getattr(torch, spec.gpu_dtype)
    if spec.id == config.TINY_RANDOM_MODEL_ID:
        from .families.sd1_tiny import tiny_pipeline

        return tiny_pipeline().to(device=device, dtype=dtype)
    if spec.id == config.TINY_SD3_MODEL_ID:
        from .families.sd3_tiny import tiny_sd3_pipeline

        return tiny_sd3_pipeline().to(device=device, dtype=dtype)
    if spec.id == config.TINY_SDXL_MODEL_ID:
        from .families.sdxl_tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline().to(device=device, dtype=dtype)
    if spec.id == config.TINY_FLUX_MODEL_ID:
        from .families.flux_tiny import tiny_flux_pipeline

        return tiny_flux_pipeline().to(device=device, dtype=dtype)
    return family_named(spec.family).load(spec.source, device, dtype, local_files_only=not spec.hub)

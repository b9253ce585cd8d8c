"""Loading the models the config allows: one pipeline per id per process.

CUDA with float16 where a GPU is present, else CPU with float32. Only ids in
``config.MODELS`` load; ``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from . import config
from .images import fit_latent_rgb
from .tokens import PromptTokens, tokenize

# A fast (Rust) tokenizer keeps its padding and truncation settings as state that every call
# rewrites: two threads tokenizing at once can swap settings, and a prompt padded to 77 tokens
# comes back unpadded (8 tokens), so a run silently gets other text embeddings. Every use of
# a shared tokenizer goes through its lock (LoadedModel.encode_prompt / .tokenize).
_TOKENIZER_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZER_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.Lock:
    """The one lock of this tokenizer object (shared by every pipeline that holds it)."""
    with _TOKENIZER_LOCKS_GUARD:
        return _TOKENIZER_LOCKS.setdefault(tokenizer, threading.Lock())


@dataclass
class LoadedModel:
    """A pipeline with what the explainer needs to know about it."""

    id: str
    pipe: StableDiffusionPipeline
    latent_rgb: np.ndarray  # (C [+1]) x 3 fast-preview map
    spec: config.ModelSpec | None = None

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def encode_prompt(self, prompt: str, negative_prompt: str = "", guided: bool = True) -> torch.Tensor:
        """Text embeddings, in diffusers' batch order under guidance: [unconditional, conditional]."""
        with tokenizer_lock(self.pipe.tokenizer):
            positive, negative = self.pipe.encode_prompt(
                prompt, self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                negative_prompt=negative_prompt or None,
            )
        return torch.cat([negative, positive]) if guided else positive

    def tokenize(self, prompt: str) -> PromptTokens:
        """The prompt's tokens and words (see ``tokens.tokenize``), safe beside other threads."""
        with tokenizer_lock(self.pipe.tokenizer):
            return tokenize(self.pipe.tokenizer, prompt)

    def check_prompt(self, prompt: str) -> None:
        """For a closed-vocabulary model, a ValueError naming the words it does not know."""
        if self.spec is None or not self.spec.closed_vocabulary:
            return
        vocabulary = self.pipe.tokenizer.get_vocab()
        words = re.findall(r"[^\s,.;:!?]+", prompt.lower())
        unknown = sorted({w for w in words if w + "</w>" not in vocabulary})
        if unknown:
            known = sorted(t.removesuffix("</w>") for t in vocabulary if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 5)
            raise ValueError(
                f"Words not in the {self.id} model's vocabulary: {', '.join(map(repr, unknown))}. "
                f"It knows: {', '.join(known)}."
            )

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline, model_id: str = "custom", spec=None) -> LoadedModel:
        """Wrap a pipeline built elsewhere (tests, notebooks)."""
        if spec is not None and spec.latent_rgb is not None:
            factors = np.asarray(spec.latent_rgb, dtype=np.float32)
        else:
            factors = fit_latent_rgb(pipe.vae)
        pipe.set_progress_bar_config(disable=True)
        return cls(id=model_id, pipe=pipe, latent_rgb=factors, spec=spec)

    def randomised(self, seed: int = 0) -> LoadedModel:
        """The same pipeline with the UNet's weights re-initialised (seeded): the model randomisation
        test of Adebayo et al. (2018), where an explanation that does not change is not explaining."""
        torch.manual_seed(seed)
        unet = type(self.pipe.unet).from_config(self.pipe.unet.config).eval()
        pipe = type(self.pipe)(**{**self.pipe.components, "unet": unet})
        return LoadedModel.from_pipeline(pipe, model_id=self.id + "-randomised")


def preferred_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def share_cpu_cores(concurrent_runs: int) -> int:
    """On a CPU, give each of ``concurrent_runs`` runs its share of the cores as PyTorch threads;
    returns the count set (nothing is changed on a GPU, where it returns 0).

    More threads than that only oversubscribe the cores when runs overlap. And a server runs its
    work in many threads: while one live thread holds an OpenMP team, libgomp runs another
    thread's parallel regions 2-3x slower (its ``do_spin`` cuts the spin-wait short once it
    manages more threads than cores; pytorch#37259). One thread per run makes no team: on 2
    cores the embedded model's run takes 0.8 s in any thread, against 0.55 s alone with 2
    threads but 1.1 s beside another team.
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
    if not spec.hub and spec.source and not (Path(spec.source) / "model_index.json").is_file():
        raise ValueError(f"{spec.label} has no weights in {config.portable_path(spec.source)}: train it first "
                         "(see assets/README.md).")


def _what_to_do_instead(spec: config.ModelSpec) -> str:
    others = [s.label for s in config.MODELS.values() if not (s.hub or s.needs_gpu) and s.id != spec.id]
    where = f"choose {others[0]!r}, which runs on this machine, " if others else ""
    return f"To explain a model here, {where}or use {spec.label} where a GPU and the Hub are available (the Space)."


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


def _build_pipeline(spec: config.ModelSpec) -> StableDiffusionPipeline:
    device, dtype = preferred_device()
    if spec.id == config.TINY_RANDOM_MODEL_ID:
        from .tiny import tiny_pipeline

        return tiny_pipeline().to(device=device, dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        spec.source,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=not spec.hub,
        use_safetensors=True,
    )
    return pipe.to(device)

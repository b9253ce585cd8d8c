"""One place for every fact a person duplicating the Space may want to change.

Model ids, what each model defaults to, and the limits the library enforces all live here.
Nothing else in the project names a model id or a limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"


@dataclass(frozen=True)
class ModelSpec:
    """A model the app may load.

    Attributes:
        id: the name users pass (UI dropdown, API, ``load_model``).
        family: the model family's adapter (a key of ``explainer.families.FAMILIES``).
        source: a local folder (embedded model) or a Hugging Face Hub repo id.
        label: what the UI shows.
        hub: True when ``source`` is a Hub repo id (only loadable on the Space).
        needs_gpu: refused on a machine without a GPU (a CPU run would take many minutes);
            set it False to allow one anyway.
        width, height, steps, guidance: defaults the UI starts from for this model.
        vae_decode_every: on a GPU, the run decodes both views with the VAE every this many
            steps (the last step always); on a CPU it decodes the last step only, and the app
            decodes a step's views when it shows them. The fast linear preview is made every step.
        latent_rgb: optional fixed (channels [+ 1 bias row]) x 3 latent -> RGB map for the fast
            preview; fitted from the family's decoder at load time when absent.
        examples: prompts shown as examples for this model.
        max_sequence_length: the T5 tokens of a family that has a T5 encoder (SD 3, without the
            encoder that many zero tokens; FLUX.1, whose maps read them); None: the pipeline's own default.
        gated: the Hub asks for a token of an account that accepted the model's licence.
        gpu_dtype: the torch dtype the model loads in on a GPU ("float16"; "bfloat16" for a model whose
            activations overflow float16, as FLUX.1's); a CPU loads float32.
        preload: on ZeroGPU, loaded into memory at startup (a Hub model); False: loaded when first asked
            for, as the largest are (SD 3.5 with T5, FLUX.1: tens of GB together).
        concepts: the words ConceptAttention starts from for this model (words of its vocabulary).
        trained_by: for an embedded model, the command that trains it and saves it to ``source``.
        listed: among the models the page's list offers first; the tiny test models are not, and
            come last (the list holds every model of the config: the API takes no other id).
    """

    id: str
    source: str
    label: str
    hub: bool
    width: int
    height: int
    steps: int
    guidance: float
    vae_decode_every: int = 1
    needs_gpu: bool = False
    listed: bool = True
    preload: bool = True
    concepts: tuple[str, ...] = ("circle", "square", "background")
    trained_by: str = ""
    closed_vocabulary: bool = False  # every word must be one token of the tokenizer (the shapes model)
    latent_rgb: tuple[tuple[float, float, float], ...] | None = None
    examples: tuple[str, ...] = ()
    family: str = "sd1"
    max_sequence_length: int | None = None
    gated: bool = False
    gpu_dtype: str = "float16"


# Approximate latent -> RGB map of the SD v1 VAE (widely used for live previews).
SD_V1_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)

PAPER_PROMPTS = (
    "a photo of an astronaut riding a horse",
    "a cat playing soccer",
    "A portrait photo of a zebra and a giraffe and a tiger",
    "a photo of some plants surrounding lightbulb",
    "a portrait photo of an apple on the banana",
    "A cat riding on a bicycle",
    "A bear playing piano",
    "A Lego Statue of Liberty",
    "A shark in the desert",
    "An angry duck doing heavy weightlifting at the gym",
)

SHAPES_PROMPTS = (
    "a red circle on the left",
    "a big blue square at the top",
    "a small green triangle in the center and a yellow circle on the right",
    "a purple triangle at the bottom",
    "an orange square on the right",
)

def _stable_diffusion_1(repo_id: str, label: str) -> ModelSpec:
    """A Stable Diffusion 1.x checkpoint of the Hub, with the paper's settings as its defaults."""
    return ModelSpec(
        id=repo_id, source=repo_id, label=label, hub=True, needs_gpu=True, width=512, height=512, steps=30,
        guidance=7.5, vae_decode_every=5, latent_rgb=SD_V1_LATENT_RGB, examples=PAPER_PROMPTS,
    )


def _embedded_spec(model_id: str, folder: str, label: str, **changes) -> ModelSpec:
    """An embedded model of the shapes world: its weights in assets/<folder>, 64x64 at 20 steps and guidance 5,
    the world's closed vocabulary, prompts and shape nouns as concepts (the vocabulary has no "background")."""
    fields = dict(id=model_id, source=str(ASSETS_DIR / folder), label=label, hub=False, width=64, height=64, steps=20,
                  guidance=5.0, closed_vocabulary=True, examples=SHAPES_PROMPTS, concepts=("circle", "square", "triangle"))
    return ModelSpec(**(fields | changes))


def _tiny_spec(model_id: str, family: str, label: str, **changes) -> ModelSpec:
    """A tiny test model: built from configs by explainer.families.<family>_tiny with random weights
    (no source), left off the page's list, 64x64 at 10 steps and guidance 5 unless ``changes`` say otherwise."""
    fields = dict(id=model_id, family=family, source="", label=label, hub=False, listed=False, width=64, height=64,
                  steps=10, guidance=5.0, examples=("a cat playing soccer",))
    return ModelSpec(**(fields | changes))


EMBEDDED_MODEL_ID = "embedded/shapes-ldm"
EMBEDDED_MMDIT_MODEL_ID = "embedded/shapes-mmdit"
EMBEDDED_MODEL_IDS = (EMBEDDED_MODEL_ID, EMBEDDED_MMDIT_MODEL_ID)  # one per family: the UNet, the MM-DiT
TINY_RANDOM_MODEL_ID = "tiny-random"
TINY_SD3_MODEL_ID = "tiny-sd3"
TINY_SDXL_MODEL_ID = "tiny-sdxl"
TINY_FLUX_MODEL_ID = "tiny-flux"

MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        _embedded_spec(EMBEDDED_MODEL_ID, "shapes-ldm", "Shapes world (embedded, runs on CPU)",
                       trained_by="python -m explainer.shapes.train --resume"),
        _embedded_spec(EMBEDDED_MMDIT_MODEL_ID, "shapes-mmdit", "Shapes world MM-DiT (embedded, SD 3's design, runs on CPU)",
                       trained_by="python -m explainer.shapes.train_mmdit --resume, then --export-only", family="sd3",
                       max_sequence_length=1),  # no T5 encoder: one zero token stands in for T5's (the model card)
        _tiny_spec(TINY_RANDOM_MODEL_ID, "sd1", "Tiny random model (for tests; pictures mean nothing)"),
        _tiny_spec(
            TINY_SD3_MODEL_ID, "sd3", "Tiny random SD 3 model (for tests; pictures mean nothing)",
            max_sequence_length=8,  # zero T5 tokens: the tiny model has no T5 encoder
        ),
        _tiny_spec(TINY_SDXL_MODEL_ID, "sdxl", "Tiny random SDXL model (for tests; pictures mean nothing)"),
        _tiny_spec(
            TINY_FLUX_MODEL_ID, "flux", "Tiny random FLUX.1 model (for tests; pictures mean nothing)",
            steps=4,
            guidance=0.0,  # guidance-distilled as FLUX.1-schnell: no guidance input, no unconditional half
            max_sequence_length=16,  # T5 tokens (the tiny T5 tokenizer's limit)
        ),
        _stable_diffusion_1("CompVis/stable-diffusion-v1-4", "Stable Diffusion v1.4 (the paper's model, GPU)"),
        _stable_diffusion_1("stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion v1.5 (GPU)"),
        ModelSpec(
            id="stabilityai/stable-diffusion-3.5-medium",
            source="stabilityai/stable-diffusion-3.5-medium",
            label="Stable Diffusion 3.5 Medium (MM-DiT, flow matching; GPU, gated)",
            hub=True,
            needs_gpu=True,
            gated=True,
            family="sd3",
            width=1024,
            height=1024,
            steps=40,  # the model card's diffusers example: 40 steps, guidance 4.5
            guidance=4.5,
            vae_decode_every=5,
            examples=PAPER_PROMPTS,
            preload=False,  # gated, and with T5 about 15 GB: loaded when first asked for
        ),
        ModelSpec(
            id="stabilityai/stable-diffusion-xl-base-1.0",
            source="stabilityai/stable-diffusion-xl-base-1.0",
            label="Stable Diffusion XL base 1.0 (two text encoders; GPU)",
            hub=True,
            needs_gpu=True,
            family="sdxl",
            width=1024,
            height=1024,
            steps=30,  # the model card's example calls the pipeline with its defaults: 50 steps, guidance 5.0
            guidance=5.0,
            vae_decode_every=5,
            # no fixed preview map: the family fits one to its VAE at load (fit_preview)
            examples=PAPER_PROMPTS,
        ),
        ModelSpec(
            id="black-forest-labs/FLUX.1-schnell",
            source="black-forest-labs/FLUX.1-schnell",
            label="FLUX.1 [schnell] (MM-DiT, guidance-distilled, 4 steps; GPU, Apache 2.0)",
            hub=True,
            needs_gpu=True,
            family="flux",
            width=1024,
            height=1024,
            steps=4,  # the model card's diffusers example: 4 steps, guidance 0.0, max_sequence_length 256
            guidance=0.0,
            max_sequence_length=256,
            vae_decode_every=5,  # on a GPU; a step between is decoded when shown (28 steps at 1024²: docs/design.md)
            gpu_dtype="bfloat16",  # the model card's; float16 overflows in T5 and the transformer
            examples=PAPER_PROMPTS,
            preload=False,  # about 33 GB with T5: loaded when first asked for
        ),
    )
}


@dataclass(frozen=True)
class Limits:
    """Bounds the library enforces on what it is asked to compute (the app shows them; its own
    settings, such as queue and streaming, are in ``ui/settings.py``)."""

    max_steps: int = 100
    min_side: int = 8
    max_side: int = 1024
    min_image_side: int = 8  # an image to explain (image mode): smallest side, and most pixels before resizing
    max_image_pixels: int = 8192 * 8192
    inversion_refinements: int = 3  # fixed-point refinements of each inverted step (docs/design.md, "Inverting an image")
    side_multiple: int = 8
    max_guidance: float = 30.0
    max_concentration: float = 500.0
    max_prompt_chars: int = 1000
    max_seed: int = 2**63 - 1
    max_masks: int = 4000  # DF-RISE
    max_rise_grid: int = 64  # the side of DF-RISE's coarse grid masks
    max_lime_samples: int = 100_000  # DF-LIME's on/off vectors
    max_batch_size: int = 4096  # inputs per denoiser call of a perturbation method or metric
    # Token relevance keeps every attention map of a step for its backward pass: it stops, with a
    # message, before they take more than this share of the accelerator memory free when it starts
    # (the rest is for the backward pass itself; docs/design.md, "Token relevance at large sizes").
    relevance_memory_share: float = 0.5
    # Per-group attention maps (block and resolution) are kept at their own resolution, pooled to
    # at most this side (why: docs/design.md, "Attention records by layer group").
    max_group_map_side: int = 32


LIMITS = Limits()

SCHEDULERS = ("dpm++", "ddim")
SCHEDULE_KINDS = ("uniform", "early", "latter")


@dataclass(frozen=True)
class Defaults:
    """Settings a run starts from when the caller gives none."""

    seed: int = 1
    schedule: str = "uniform"
    concentration: float = 60.0
    scheduler: str = "dpm++"
    negative_prompt: str = ""
    image_mode: str = "noise"  # an image run's trajectory (image_mode.MODES)
    image_guidance: float = 1.0  # an image run's guidance: the prompt's prediction alone, which inverts best


DEFAULTS = Defaults()


# Hub ids are only loaded where the Hub is reachable (the Space); tests and CI set this.
HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def default_model_id() -> str:
    """The embedded model once its weights are in assets/, else the tiny random one."""
    return TINY_RANDOM_MODEL_ID if weights_missing(MODELS[EMBEDDED_MODEL_ID]) else EMBEDDED_MODEL_ID


def weights_missing(spec: ModelSpec) -> bool:
    """An embedded model whose weights are not (yet) in its folder."""
    return not spec.hub and bool(spec.source) and not Path(spec.source, "model_index.json").is_file()


def embedded_models_present() -> list[str]:
    """The embedded models whose weights are in assets/ (one per family: the UNet, the MM-DiT)."""
    return [model_id for model_id in EMBEDDED_MODEL_IDS if not weights_missing(MODELS[model_id])]


def portable_path(path: str | Path) -> str:
    """How a file of this server is named in what leaves it (exports, API data): relative to the
    repository when inside it ("assets/shapes-ldm"), else by its name alone."""
    path = Path(path)
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def run_decode_every(spec: ModelSpec, on_gpu: bool) -> int:
    """How often the run itself VAE-decodes a step's views (0: the last step only); see ``ModelSpec``."""
    return spec.vae_decode_every if on_gpu else 0


def model_spec(model_id: str) -> ModelSpec:
    """The spec of an allowed model; a clear ValueError for anything else."""
    if model_id not in MODELS:
        allowed = ", ".join(repr(m) for m in MODELS)
        raise ValueError(f"Unknown model {model_id!r}: this app only loads the models in its config ({allowed}).")
    return MODELS[model_id]


__all__ = [
    "DEFAULTS",
    "LIMITS",
    "MODELS",
    "ModelSpec",
    "default_model_id",
    "model_spec",
]

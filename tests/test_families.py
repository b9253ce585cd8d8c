"""The contract every family keeps, checked on the tiny SD 3, SDXL and FLUX.1 models: the run equals the
plain pipeline, maps sum to one over the text, capture swaps only its sites and leaves nothing behind,
runs in two threads equal runs in sequence, every method gives a map, a half-precision model gives the
same maps, relevance rebuilds the conditioning. What one family alone does is tested in its own module
(test_sd3.py, test_sdxl.py, test_flux.py); where a family differs here, the difference is a parameter."""

import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_methods import CASES, IDS

from explainer import config
from explainer.capture import AttentionRecorder, capture_attention
from explainer.families import FAMILIES
from explainer.families.flux_tiny import tiny_flux_pipeline
from explainer.families.sd3_tiny import tiny_sd3_pipeline
from explainer.families.sdxl_tiny import tiny_sdxl_pipeline
from explainer.methods import METHODS, cam_layers
from explainer.methods.relevance import RelevanceState, relevance_hooks
from explainer.models import LoadedModel, load_model
from explainer.replay import guided_prediction, noise_from, step_from, step_inputs
from explainer.run import InstrumentedRun, RunSettings
from explainer.schedules import flow_sigmas
from explainer.schedules import timesteps as schedule_timesteps

PROMPT = "a cat on a red circle"
STEP = 3

SD3_GROUPS = {f"block {i}": [f"transformer_blocks.{i}.attn.processor"] for i in range(3)}
SDXL_GROUPS = {  # the tiny UNet at 64x64: no attention at 8x8, one transformer layer at 4x4, two at 2x2
    "down 4×4": ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"],
    "down 2×2": [f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn2.processor" for i in range(2)],
    "up 2×2": [f"up_blocks.0.attentions.{a}.transformer_blocks.{i}.attn2.processor" for a in range(2) for i in range(2)],
    "up 4×4": [f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn2.processor" for a in range(2)],
    "mid 2×2": [f"mid_block.attentions.0.transformer_blocks.{i}.attn2.processor" for i in range(2)],
}
FLUX_SITES = [f"transformer_blocks.{i}.attn.processor" for i in range(2)] + [
    f"single_transformer_blocks.{i}.attn.processor" for i in range(2)
]
FLUX_GROUPS = {"double blocks 0–1": FLUX_SITES[:2], "single block 0": FLUX_SITES[2:3], "single block 1": FLUX_SITES[3:]}


@dataclass(frozen=True)
class Tiny:
    """A tiny model and the facts of its family that more than one contract test reads."""

    name: str  # the test id
    family: str  # a key of FAMILIES
    model_id: str
    build: Callable  # the pipeline, with random weights
    guidance: float  # the settings' default, and the shared run's
    halves: int  # a step's batch: unconditional and conditional (2), or FLUX's one prediction (1)
    text_share: bool  # joint attention: the records keep the image's share of attention on the text
    groups: dict[str, list[str]]  # the attention groups; their sites in order are the capture sites

    def load(self, pipe=None) -> LoadedModel:
        pipe = self.build() if pipe is None else pipe
        return LoadedModel.from_pipeline(pipe, self.model_id, spec=config.MODELS[self.model_id])


SD3 = Tiny("sd3", "sd3", config.TINY_SD3_MODEL_ID, tiny_sd3_pipeline, guidance=5.0, halves=2, text_share=True, groups=SD3_GROUPS)
SDXL = Tiny("sdxl", "sdxl", config.TINY_SDXL_MODEL_ID, tiny_sdxl_pipeline, guidance=5.0, halves=2, text_share=False,
            groups=SDXL_GROUPS)
# FLUX.1-schnell's shape (no guidance input), and FLUX.1-dev's (the guidance scale is an input, an embedding)
FLUX = Tiny("flux", "flux", config.TINY_FLUX_MODEL_ID, tiny_flux_pipeline, guidance=0.0, halves=1, text_share=True, groups=FLUX_GROUPS)
FLUX_DEV = Tiny("flux-dev", "flux", config.TINY_FLUX_MODEL_ID, partial(tiny_flux_pipeline, guidance_embeds=True), guidance=3.5,
                halves=1, text_share=True, groups=FLUX_GROUPS)


def for_models(*tinies):
    """Parametrize a test over these tiny models, each named by its id."""
    return pytest.mark.parametrize("tiny", tinies, ids=lambda tiny: tiny.name)


def settings(tiny, **changes):
    base = dict(prompt=PROMPT, steps=4, guidance=tiny.guidance, width=64, height=64, seed=3)
    return RunSettings(**(base | changes))


def once(cache, key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


@pytest.fixture(scope="module")
def built():
    """Each tiny model and its run, made on first use and shared by the module's tests."""
    return {}


@pytest.fixture
def model(built, tiny):
    return once(built, tiny.name, tiny.load)


@pytest.fixture
def run(built, tiny, model):
    return once(built, (tiny.name, "run"), lambda: InstrumentedRun(model, settings(tiny)).run_all().data)


# --- the run equals the plain pipeline


def flow_picture(model, run):
    """The plain pipeline's picture and the timesteps it took, with its own scheduler: the run's settings,
    the run's sigmas where its schedule sets them."""
    s = run.settings
    picture = model.pipe(
        s.prompt, num_inference_steps=s.steps, sigmas=flow_sigmas(s.schedule, s.steps, s.concentration),
        guidance_scale=s.guidance, width=s.width, height=s.height, generator=torch.Generator().manual_seed(s.seed),
        output_type="np", max_sequence_length=model.spec.max_sequence_length,
    ).images[0]
    return picture, model.pipe.scheduler.timesteps.tolist()


def sdxl_picture(model, run):
    """The plain pipeline's picture, and the timesteps it took, with the run's scheduler class and
    schedule, seed and settings."""
    pipe = model.pipe
    original = pipe.scheduler
    pipe.scheduler = type(run.scheduler).from_config(run.scheduler.config)
    settings = run.settings
    custom = schedule_timesteps(settings.schedule, settings.steps, settings.concentration)
    steps = {"num_inference_steps": settings.steps} if custom is None else {"timesteps": custom}
    try:
        picture = pipe(
            settings.prompt, negative_prompt=settings.negative_prompt or None, guidance_scale=settings.guidance,
            width=settings.width, height=settings.height, generator=torch.Generator().manual_seed(settings.seed),
            output_type="np", **steps,
        ).images[0]
        return picture, pipe.scheduler.timesteps.tolist()
    finally:
        pipe.scheduler = original


PICTURE = {"sd3": flow_picture, "sdxl": sdxl_picture, "flux": flow_picture}


def sd3_with_dynamic_shift():
    """A resolution-dependent shift: mu from the image's token count, as the pipeline computes it."""
    pipe = tiny_sd3_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    return pipe


flux_schnell = partial(tiny_flux_pipeline, guidance_embeds=False, dynamic_shift=False)
flux_dev = partial(tiny_flux_pipeline, guidance_embeds=True, dynamic_shift=True)


def flow_case(tiny, build, schedule, guidance, name):
    changes = dict(steps=5, schedule=schedule, concentration=10, guidance=guidance)
    return pytest.param(tiny, build, changes, id=name)


# build: a fresh pipeline for the case; None: the module's model (SDXL's cases change only the settings)
@pytest.mark.parametrize("tiny, build, changes", [
    flow_case(SD3, tiny_sd3_pipeline, "uniform", 5.0, "sd3-uniform"),
    flow_case(SD3, tiny_sd3_pipeline, "early", 5.0, "sd3-early"),
    flow_case(SD3, tiny_sd3_pipeline, "latter", 5.0, "sd3-latter"),
    flow_case(SD3, sd3_with_dynamic_shift, "uniform", 5.0, "sd3-uniform-dynamic"),
    pytest.param(SDXL, None, {"scheduler": "dpm++"}, id="sdxl-dpm++"),
    pytest.param(SDXL, None, {"scheduler": "ddim"}, id="sdxl-ddim"),
    pytest.param(SDXL, None, {"scheduler": "dpm++", "schedule": "early", "concentration": 10}, id="sdxl-dpm++-early"),
    pytest.param(SDXL, None, {"scheduler": "ddim", "schedule": [999, 800, 600, 350, 120, 20]}, id="sdxl-ddim-timesteps"),
    # an encoded negative prompt; time ids of another size
    pytest.param(SDXL, None, {"negative_prompt": "a dog", "width": 48, "height": 80}, id="sdxl-negative-48x80"),
    pytest.param(SDXL, None, {"guidance": 1.0}, id="sdxl-unguided"),  # no unconditional half
    flow_case(FLUX, flux_schnell, "uniform", 0.0, "flux-uniform"),
    flow_case(FLUX, flux_schnell, "early", 0.0, "flux-early"),
    flow_case(FLUX_DEV, flux_dev, "latter", 3.5, "flux-dev-latter-3.5"),
    flow_case(FLUX_DEV, flux_dev, "uniform", 3.5, "flux-dev-uniform-3.5"),
    flow_case(FLUX_DEV, flux_dev, "uniform", 1.0, "flux-dev-uniform-1.0"),
])
def test_final_image_equals_the_plain_pipeline(built, tiny, build, changes):
    """Capture must not change the generation: the same text states (pooled embedding, time ids), the
    same noise (FLUX's drawn unpacked, then packed), the same sigmas or timesteps (SD 3's and FLUX's
    shifts included), one prediction per step where the family guides without a second half, the same
    steps and decoding."""
    model = tiny.load(build()) if build else once(built, tiny.name, tiny.load)
    run = InstrumentedRun(model, settings(tiny, **changes)).run_all()
    expected, timesteps = PICTURE[tiny.family](model, run)
    assert run.data.timesteps == timesteps  # the pipeline's own, after its call
    assert np.abs(expected - run.data.final_array).max() <= 1e-4  # FLUX measured: about 2e-6


# --- flow matching (SD 3, FLUX.1): the estimates and steps


@pytest.mark.parametrize("tiny, latent_channels", [pytest.param(SD3, 8, id="sd3"), pytest.param(FLUX, 4, id="flux")])
def test_each_step_is_euler_and_the_estimates_invert_the_flow(model, run, tiny, latent_channels):
    """x0_hat = x - sigma v, eps_hat = x + (1 - sigma) v, x_next = x + (sigma_next - sigma) v; replayed alike."""
    sigmas = [r.sigma for r in run.records] + [0.0]
    assert sigmas[0] == 1.0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert run.noise_levels == sigmas[:-1] and run.records[0].label == "step 1 of 4, t = 1000"
    for record, sigma, next_sigma in zip(run.records, sigmas, sigmas[1:]):
        assert record.latents.shape == (1, latent_channels, 8, 8) and record.alpha_bar == pytest.approx((1 - sigma) ** 2)
        velocity = record.noise_pred
        torch.testing.assert_close(record.x0_hat, record.latents - sigma * velocity, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(record.next_latents, record.latents + (next_sigma - sigma) * velocity, atol=1e-5, rtol=1e-5)
        inputs = step_inputs(model, run, record.index)
        assert inputs.guided == (tiny.halves == 2) and inputs.conditional_index == tiny.halves - 1
        assert inputs.conditioning.halves == tiny.halves
        with torch.no_grad():
            prediction = guided_prediction(model, inputs, inputs.latents)
        torch.testing.assert_close(prediction, velocity, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_from(model, inputs, inputs.latents, prediction), record.next_latents, atol=1e-5, rtol=1e-5)
        noise = noise_from(model, inputs, inputs.latents, prediction)
        torch.testing.assert_close((1 - sigma) * record.x0_hat + sigma * noise, record.latents, atol=1e-5, rtol=1e-5)


# --- attention capture

# where each group's maps are made: the transformers' 4x4 patch grid; the UNet's resolution, as its label says
GROUP_GRIDS = {
    "sd3": dict.fromkeys(SD3_GROUPS, (4, 4)),
    "sdxl": {label: (int(label[-1]), int(label[-1])) for label in SDXL_GROUPS},
    "flux": dict.fromkeys(FLUX_GROUPS, (4, 4)),
}


@pytest.mark.parametrize("tiny, guidance", [
    pytest.param(SD3, 5.0, id="sd3-5.0"), pytest.param(SD3, 1.0, id="sd3-1.0"),
    pytest.param(SDXL, 5.0, id="sdxl-5.0"), pytest.param(SDXL, 1.0, id="sdxl-1.0"),
    pytest.param(FLUX_DEV, 0.0, id="flux-dev-0.0"), pytest.param(FLUX_DEV, 3.5, id="flux-dev-3.5"),
])
def test_maps_sum_to_one_over_the_text_in_every_group(model, tiny, guidance):
    data = InstrumentedRun(model, settings(tiny, guidance=guidance, per_group=True)).run_all().data
    assert data.attention_groups == tiny.groups
    rows = data.tokens.stored_positions + 1  # the prompt's kept positions and the padding row
    finest = max(GROUP_GRIDS[tiny.family].values())  # a step's map: on its finest layer's grid, not upsampled
    assert finest == (4, 4)  # the transformers' 2x2 patches; SDXL's first level has no attention
    for record in data.records:
        assert record.attention.shape == (rows, *finest) and record.attention.dtype == np.float16
        assert np.abs(record.attention.astype(np.float32).sum(0) - 1).max() <= 1e-3  # the padding row included
        if tiny.text_share:
            assert record.text_share.shape == finest and record.text_share.dtype == np.float16
            assert 0 < record.text_share.min() and record.text_share.max() < 1
        else:
            assert record.text_share is None  # cross-attention gives all of its mass to the text
        grids = GROUP_GRIDS[tiny.family]
        assert {label: maps.shape for label, maps in record.group_attention.items()} == {
            label: (rows, *grid) for label, grid in grids.items()
        }
        for maps in record.group_attention.values():  # each group on its own
            assert np.abs(maps.astype(np.float32).sum(0) - 1).max() <= 1e-3


# the capture's processor at the sites; the others it passes through (SD 3's image-only attention, SDXL's self-attention)
PROCESSORS = {
    "sd3": ("JointAttentionRecordingProcessor", ["transformer_blocks.0.attn2.processor"]),
    "sdxl": ("CrossAttentionRecordingProcessor", [site.replace(".attn2.", ".attn1.") for sites in SDXL_GROUPS.values() for site in sites]),
    "flux": ("FluxAttentionRecordingProcessor", []),
}


@for_models(SD3, SDXL, FLUX)
def test_recording_processor_matches_the_stock_one_and_only_sites_are_recorded(model, run, tiny):
    inputs = step_inputs(model, run, STEP)
    denoiser = model.denoiser
    before = denoiser.attn_processors
    with torch.no_grad():
        stock = guided_prediction(model, inputs, inputs.latents)
        with capture_attention(model) as sites:
            installed = denoiser.attn_processors
            unrecorded = guided_prediction(model, inputs, inputs.latents)
            recorder = AttentionRecorder(FAMILIES[tiny.family], (8, 8), 5, conditional_index=tiny.halves - 1,
                                         batch_size=tiny.halves, sites=sites)
            recorded = guided_prediction(model, inputs, inputs.latents, recorder=recorder)
    assert sites == [site for group in tiny.groups.values() for site in group]
    recording, passed = PROCESSORS[tiny.family]
    kinds = {key: type(proc).__name__ for key, proc in installed.items()}
    assert kinds == {**dict.fromkeys(sites, recording), **dict.fromkeys(passed, "RecorderPassthrough")}
    assert set(kinds) == set(before)  # every processor is swapped, none added
    assert torch.equal(unrecorded, stock)
    torch.testing.assert_close(recorded, stock, atol=1e-5, rtol=1e-5)
    assert denoiser.attn_processors == before


def fail(*args, **kwargs):
    raise RuntimeError("failure inside the denoiser")


RUN_FAILS_IN = {"sd3": "transformer_blocks.1", "sdxl": "mid_block", "flux": "single_transformer_blocks.1"}


@for_models(SD3, SDXL, FLUX)
def test_processors_restored_when_a_run_stops_fails_or_the_denoiser_raises(model, tiny, monkeypatch):
    denoiser = model.denoiser
    before = denoiser.attn_processors
    steps = InstrumentedRun(model, settings(tiny)).steps()
    next(steps)
    assert denoiser.attn_processors != before
    steps.close()
    assert denoiser.attn_processors == before
    steps = InstrumentedRun(model, settings(tiny)).steps()
    next(steps)
    with pytest.raises(KeyError):
        steps.throw(KeyError("failure inside the run"))
    assert denoiser.attn_processors == before
    monkeypatch.setattr(denoiser.get_submodule(RUN_FAILS_IN[tiny.family]), "forward", fail)
    with pytest.raises(RuntimeError, match="failure inside the denoiser"):
        InstrumentedRun(model, settings(tiny)).run_all()
    assert denoiser.attn_processors == before


def assert_same_records(first, second):
    assert [r.timestep for r in first.records] == [r.timestep for r in second.records]
    for a, b in zip(first.records, second.records):
        for name in ("latents", "next_latents", "x0_hat", "noise_pred"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(a.attention, b.attention) and np.array_equal(a.text_share, b.text_share)  # SDXL's: None
    assert np.array_equal(first.final_array, second.final_array)


# the second job's own settings: another scale (FLUX.1-dev's an input), SDXL's another width (its time ids)
SECOND_JOB = {"sd3": {"guidance": 7.0}, "sdxl": {"guidance": 7.0, "width": 48}, "flux": {"guidance": 2.0}}


@for_models(SD3, SDXL, FLUX_DEV)
def test_two_threads_give_the_same_records_as_in_sequence(model, tiny):
    jobs = [settings(tiny, prompt="a cat", seed=1), settings(tiny, prompt="a red dog on a circle", seed=2, **SECOND_JOB[tiny.family])]
    sequential = [InstrumentedRun(model, job).run_all().data for job in jobs]
    parallel = [InstrumentedRun(model, job) for job in jobs]
    threads = [threading.Thread(target=one.run_all) for one in parallel]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(sequential, parallel):
        assert_same_records(one, other.data)


# --- the methods


def test_every_method_is_covered_here():
    assert {name for name, _ in CASES} == set(METHODS)


# what DF-CAM explains: every block of a transformer (all of them, exactly); three of the UNet's many layers
CAM_LAYERS = {
    "sd3": ({f"transformer_blocks.{i}" for i in range(3)}, True),
    "sdxl": ({"down_blocks.0.resnets.0", "mid_block.attentions.0", "up_blocks.2.resnets.1"}, False),
    "flux": ({f"transformer_blocks.{i}" for i in range(2)} | {f"single_transformer_blocks.{i}" for i in range(2)}, True),
}


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
@for_models(SD3, SDXL, FLUX, FLUX_DEV)
def test_every_method_gives_a_finite_map_that_is_not_flat(model, run, tiny, name, options):
    first = METHODS[name](**options).explain(model, run, STEP)
    again = METHODS[name](**options).explain(model, run, STEP)
    assert first.method == name and first.timestep == run.records[STEP - 1].timestep
    assert first.saliency.shape == (8, 8) and first.saliency.dtype == np.float32
    assert np.isfinite(first.saliency).all() and first.saliency.min() >= 0 and first.saliency.max() <= 1
    assert np.ptp(first.saliency) > 0
    assert np.array_equal(first.saliency, again.saliency)
    if name == "df-cam":
        layers = set(cam_layers(model))
        expected, every = CAM_LAYERS[tiny.family]
        assert set(first.per_layer) == layers and (layers == expected if every else expected <= layers)
    if name == "relevance":
        assert set(first.token_scores) == {f"{i}:{w}" for i, w in enumerate(run.tokens.word_texts)}


@pytest.mark.parametrize("tiny, dtype, cases", [
    pytest.param(SD3, torch.float16, CASES, id="sd3-float16"),
    pytest.param(SDXL, torch.float16, [("relevance", {}), ("df-cam", {}), ("df-rise", {"n_masks": 8, "batch_size": 3})], id="sdxl-float16"),
    pytest.param(FLUX, torch.bfloat16, CASES, id="flux-bfloat16"),  # FLUX.1's activations overflow float16
])
def test_a_half_precision_model_runs_and_gives_the_float32_maps(model, run, tiny, dtype, cases):
    """As the app loads every model on a GPU (CPU float16 or bfloat16 here): dtype slips show up now."""
    half = tiny.load(tiny.build().to(dtype=dtype))
    half_run = InstrumentedRun(half, run.settings).run_all().data
    assert np.abs(half_run.final_array - run.final_array).max() < 0.05
    assert all(np.isfinite(r.attention.astype(np.float32)).all() for r in half_run.records)
    if tiny.text_share:
        assert all(np.isfinite(r.text_share).all() for r in half_run.records)
    for name, options in cases:
        full = METHODS[name](**options).explain(model, run, STEP).saliency
        saliency = METHODS[name](**options).explain(half, run, STEP).saliency
        assert np.isfinite(saliency).all() and np.corrcoef(full.ravel(), saliency.ravel())[0, 1] > 0.9, f"{name} {options}"


# the modules whose hooks are counted (the denoiser, the text encoders the methods hook); where the failure is raised
HOOKED = {
    "sd3": (("transformer", "text_encoder"), "transformer_blocks.2"),
    "sdxl": (("unet", "text_encoder", "text_encoder_2"), "up_blocks.1"),
    "flux": (("transformer", "text_encoder_2"), "single_transformer_blocks.1"),
}


@pytest.mark.parametrize("name", ["df-cam", "relevance", "df-rise"])
@for_models(SD3, SDXL, FLUX)
def test_no_hook_or_processor_left_after_a_method_or_an_error(model, run, tiny, monkeypatch, name):
    parts, failing = HOOKED[tiny.family]
    modules = [m for part in parts for m in getattr(model.pipe, part).modules()]
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)  # noqa: E731
    processors, count = model.denoiser.attn_processors, hooks()
    options = {"n_masks": 4, "batch_size": 4} if name == "df-rise" else {}
    METHODS[name](**options).explain(model, run, STEP)
    assert model.denoiser.attn_processors == processors and hooks() == count
    monkeypatch.setattr(model.denoiser.get_submodule(failing), "forward", fail)
    with pytest.raises(RuntimeError, match="failure inside"):
        METHODS[name](**options).explain(model, run, STEP)
    monkeypatch.undo()
    assert model.denoiser.attn_processors == processors and hooks() == count


class Relevance(NamedTuple):
    """What a family's relevance pass is made of."""

    conditioning: list[str]  # the conditioning's tensors, in order
    text_length: int  # the prompt's token positions: CLIP's 77, or FLUX's T5 tokens
    latent_size: tuple[int, int] | None  # given to the state where the family needs it (FLUX's single-stream blocks)
    layers: list[tuple[str, int]]  # the denoiser's attention layers: (kind, image tokens), in forward order
    text_layers: int  # the layers of the text encoder whose tokens the prompt's positions are
    gradients: dict[str, bool]  # which conditioning tensors carry the gradient, where the family splits them


RELEVANCE = {
    # block 0 has two attentions (joint, then image-only); CLIP-L's layers
    "sd3": Relevance(["encoder_hidden_states", "pooled_projections"], 77, None,
                     [("joint", 16), ("self", 16), ("joint", 16), ("joint", 16)], 2, {}),
    # self- and cross-attention in each of the 11 transformer layers, on the 4x4 and 2x2 grids; the first
    # encoder's (CLIP-L's) layers; the second encoder's pooled part is kept as it is
    "sdxl": Relevance(["encoder_hidden_states", "text_embeds"], 77, None,
                      [(kind, tokens) for tokens in (16, 4, 4, 4, 4, 4, 4, 4, 4, 16, 16) for kind in ("self", "cross")], 3,
                      {"encoder_hidden_states": True, "text_embeds": False}),
    # double- and single-stream blocks alike; T5's layers, whose tokens the maps read
    "flux": Relevance(["encoder_hidden_states", "pooled_projections", "guidance"], 16, (8, 8), [("joint", 16)] * 4, 2, {}),
}


@for_models(SD3, SDXL, FLUX_DEV)
def test_relevance_rebuilds_the_conditioning_and_its_hooks_do_not_change_the_model(model, run, tiny):
    expected, family = RELEVANCE[tiny.family], FAMILIES[tiny.family]
    pipe, inputs = model.pipe, step_inputs(model, run, STEP)
    ids = torch.tensor([run.tokens.ids])
    assert ids.shape == (1, expected.text_length)
    with torch.no_grad():
        rebuilt = family.encode_ids(pipe, ids, inputs.conditioning)  # as encode_prompt built it, bit for bit
        stock = guided_prediction(model, inputs, inputs.latents)
    assert list(rebuilt.tensors) == expected.conditioning
    assert all(torch.equal(rebuilt.tensors[name], inputs.conditioning.tensors[name]) for name in inputs.conditioning.tensors)
    state = RelevanceState(conditional_index=tiny.halves - 1, batch_size=tiny.halves, rectify="abs", latent_size=expected.latent_size)
    with relevance_hooks(model, state), torch.enable_grad():
        ours = family.encode_ids(pipe, ids, inputs.conditioning)
        output = guided_prediction(model, inputs, inputs.latents)
        assert {name: ours.tensors[name].requires_grad for name in expected.gradients} == expected.gradients
    assert [(layer["kind"], layer["tokens"]) for layer in state.denoiser_layers] == expected.layers
    assert len(state.text_layers) == expected.text_layers
    for name, tensor in inputs.conditioning.tensors.items():
        torch.testing.assert_close(ours.tensors[name], tensor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, stock, atol=1e-5, rtol=1e-5)


# --- the config


@for_models(SD3, SDXL, FLUX)
def test_the_config_reaches_the_tiny_model(tiny):
    loaded, spec = load_model(tiny.model_id), config.MODELS[tiny.model_id]
    assert loaded.family.name == tiny.family and loaded.spec is spec
    assert not spec.hub and not spec.needs_gpu and not spec.listed

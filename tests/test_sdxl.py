"""The Stable Diffusion XL family on a tiny SDXL-shaped model: the run equals the pipeline (two text
encoders, the pooled embedding and the added time ids passed as it passes them), cross-attention
capture at several resolutions, every method, token relevance through the first encoder, the VAE's
upcast, and what the model's own Euler scheduler means here."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler
from test_methods import CASES, IDS

from explainer import config
from explainer.capture import AttentionRecorder, capture_attention
from explainer.families import FAMILIES
from explainer.families.sdxl import added_time_ids
from explainer.families.sdxl_tiny import POOLED_WIDTH, tiny_sdxl_pipeline
from explainer.methods import METHODS, cam_layers
from explainer.methods.relevance import RelevanceState, relevance_hooks
from explainer.models import LoadedModel, load_model
from explainer.replay import guided_prediction, model_input, step_from, step_inputs
from explainer.run import InstrumentedRun, RunSettings
from explainer.schedules import timesteps as schedule_timesteps

PROMPT = "a cat on a red circle"
STEP = 3
SDXL = FAMILIES["sdxl"]
SPEC = config.MODELS[config.TINY_SDXL_MODEL_ID]
GROUPS = {  # the tiny UNet at 64x64: no attention at 8x8, one transformer layer at 4x4, two at 2x2
    "down 4×4": ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"],
    "down 2×2": [f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn2.processor" for i in range(2)],
    "up 2×2": [f"up_blocks.0.attentions.{a}.transformer_blocks.{i}.attn2.processor" for a in range(2) for i in range(2)],
    "up 4×4": [f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn2.processor" for a in range(2)],
    "mid 2×2": [f"mid_block.attentions.0.transformer_blocks.{i}.attn2.processor" for i in range(2)],
}


def settings(**changes):
    base = dict(prompt=PROMPT, steps=4, guidance=5.0, width=64, height=64, seed=3)
    return RunSettings(**(base | changes))


@pytest.fixture(scope="module")
def model():
    return LoadedModel.from_pipeline(tiny_sdxl_pipeline(), config.TINY_SDXL_MODEL_ID, spec=SPEC)


@pytest.fixture(scope="module")
def run(model):
    return InstrumentedRun(model, settings()).run_all().data


def pipeline_image(pipe, run, **call):
    """The plain pipeline's picture, and the timesteps it took, with the run's scheduler class and
    schedule, seed and settings."""
    original = pipe.scheduler
    pipe.scheduler = type(run.scheduler).from_config(run.scheduler.config)
    settings = run.settings
    custom = schedule_timesteps(settings.schedule, settings.steps, settings.concentration)
    steps = {"num_inference_steps": settings.steps} if custom is None else {"timesteps": custom}
    try:
        picture = pipe(
            settings.prompt, negative_prompt=settings.negative_prompt or None, guidance_scale=settings.guidance,
            width=settings.width, height=settings.height, generator=torch.Generator().manual_seed(settings.seed),
            output_type="np", **steps, **call,
        ).images[0]
        return picture, pipe.scheduler.timesteps.tolist()
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("changes", [
    {"scheduler": "dpm++"},
    {"scheduler": "ddim"},
    {"scheduler": "dpm++", "schedule": "early", "concentration": 10},
    {"scheduler": "ddim", "schedule": [999, 800, 600, 350, 120, 20]},
    {"negative_prompt": "a dog", "width": 48, "height": 80},  # encoded negative prompt; time ids of another size
    {"guidance": 1.0},  # no unconditional half
])
def test_final_image_equals_the_plain_pipeline(model, changes):
    """Capture must not change the generation: same text states, pooled embedding, time ids, noise and steps."""
    run = InstrumentedRun(model, settings(**changes)).run_all()
    expected, timesteps = pipeline_image(model.pipe, run)
    assert run.data.timesteps == timesteps
    assert np.abs(expected - run.data.final_array).max() <= 1e-4


def test_the_run_keeps_sdxls_timestep_spacing(model, run):
    """The run's DDIM / DPM-Solver++ are built from SDXL's scheduler config: "leading" spacing, offset 1."""
    ddim = InstrumentedRun(model, settings(scheduler="ddim")).data
    assert ddim.timesteps == [751, 501, 251, 1]
    assert run.timesteps == [801, 601, 401, 201]
    assert not InstrumentedRun(model, settings(scheduler="ddim")).scheduler.config.set_alpha_to_one  # as SDXL's config


def test_conditioning_is_the_pipelines_and_the_time_ids_are_the_size(model):
    pipe = model.pipe
    conditioning = model.encode(PROMPT, "", guided=True)
    text, negative_text, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device=pipe.unet.device)
    assert list(conditioning.tensors) == ["encoder_hidden_states", "text_embeds"]
    assert torch.equal(conditioning.tensors["encoder_hidden_states"], torch.cat([negative_text, text]))
    assert torch.equal(conditioning.tensors["text_embeds"], torch.cat([negative_pooled, pooled]))
    assert text.shape == (1, 77, 16 + 24) and pooled.shape == (1, POOLED_WIDTH)
    assert not negative_text.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt, as SDXL base
    with_negative = model.encode(PROMPT, "a dog", guided=True).tensors
    assert with_negative["encoder_hidden_states"][0].any() and with_negative["text_embeds"][0].any()
    alone = model.encode(PROMPT, "", guided=False)
    assert alone.halves == 1 and torch.equal(alone.tensors["encoder_hidden_states"], text)
    repeated = conditioning.repeated(3)
    assert repeated.tensors["text_embeds"].shape == (6, POOLED_WIDTH) and torch.equal(repeated.tensors["text_embeds"][3], pooled[0])
    expected = pipe._get_add_time_ids((80, 48), (0, 0), (80, 48), torch.float32, text_encoder_projection_dim=POOLED_WIDTH)
    assert torch.equal(added_time_ids(pipe, 80, 48, 2, torch.float32, "cpu"), expected.repeat(2, 1))


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_maps_sum_to_one_over_the_text_at_every_resolution(model, guidance):
    data = InstrumentedRun(model, settings(guidance=guidance, per_group=True)).run_all().data
    for record in data.records:
        assert record.attention.shape == (data.tokens.stored_positions + 1, 8, 8) and record.attention.dtype == np.float16
        assert np.abs(record.attention.astype(np.float32).sum(0) - 1).max() <= 1e-3  # the padding row included
        assert record.text_share is None  # cross-attention gives all of its mass to the text
        assert {label: maps.shape[1:] for label, maps in record.group_attention.items()} == {
            label: (int(label[-1]), int(label[-1])) for label in GROUPS
        }
        for maps in record.group_attention.values():
            assert np.abs(maps.astype(np.float32).sum(0) - 1).max() <= 1e-3
    assert data.attention_groups == GROUPS


class KeepingCrossProcessor:
    """The stock attention, keeping the cross-attention probabilities it implies (computed here independently)."""

    def __init__(self, kept, layer, stock):
        self.kept, self.layer, self.stock = kept, layer, stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        def heads(x):  # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim)
            return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(encoder_hidden_states))
        self.kept[self.layer] = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1)  # (batch, heads, N, L)
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_recorded_maps_are_the_conditional_cross_attention_at_each_resolution(model, run):
    """Against an independent computation: per layer, the conditional half's probabilities, heads
    averaged, padding summed, upsampled from the layer's grid; averaged over the layers."""
    inputs = step_inputs(model, run, STEP)
    unet, kept_positions = model.denoiser, run.tokens.stored_positions
    sites = SDXL.cross_attention_sites(unet)
    with torch.no_grad(), capture_attention(model):
        recorder = AttentionRecorder(SDXL, (8, 8), kept_positions, conditional_index=1, batch_size=2, sites=sites)
        guided_prediction(model, inputs, inputs.latents, recorder=recorder)
        maps, _ = recorder.finish_step()
    kept, originals = {}, unet.attn_processors
    try:
        unet.set_attn_processor({key: KeepingCrossProcessor(kept, key, proc) if key in sites else proc for key, proc in originals.items()})
        with torch.no_grad():
            guided_prediction(model, inputs, inputs.latents)
    finally:
        unet.set_attn_processor(originals)
    assert set(kept) == set(sites) and len(sites) == 11
    expected = []
    for probs in kept.values():
        mean = probs[1].mean(0)  # the conditional half, (N, L)
        side = int(mean.shape[0] ** 0.5)
        rows = torch.cat([mean[:, :kept_positions], mean[:, kept_positions:].sum(1, keepdim=True)], 1)
        expected.append(F.interpolate(rows.T.reshape(1, -1, side, side), size=(8, 8), mode="bilinear", align_corners=False)[0])
    np.testing.assert_allclose(maps, torch.stack(expected).mean(0).numpy(), atol=2e-3)  # float16 records


def test_recording_processor_matches_the_stock_one_and_only_cross_sites_are_swapped(model, run):
    inputs = step_inputs(model, run, STEP)
    unet = model.denoiser
    before = unet.attn_processors
    with torch.no_grad():
        stock = guided_prediction(model, inputs, inputs.latents)
        with capture_attention(model) as sites:
            installed = unet.attn_processors
            unrecorded = guided_prediction(model, inputs, inputs.latents)
            recorder = AttentionRecorder(SDXL, (8, 8), 5, conditional_index=1, batch_size=2, sites=sites)
            recorded = guided_prediction(model, inputs, inputs.latents, recorder=recorder)
    assert sorted(sites) == sorted(key for keys in GROUPS.values() for key in keys)
    kinds = {key: type(proc).__name__ for key, proc in installed.items()}
    assert kinds == {key: "CrossAttentionRecordingProcessor" if key in sites else "RecorderPassthrough" for key in before}
    assert all(key.replace(".attn2.", ".attn1.") in kinds for key in sites)  # self-attention beside every site
    assert torch.equal(unrecorded, stock)
    torch.testing.assert_close(recorded, stock, atol=1e-5, rtol=1e-5)
    assert unet.attn_processors == before


def test_replay_predicts_and_steps_as_the_run(model):
    """step_inputs rebuilds the step (text, pooled embedding, time ids): the guided prediction is the
    run's; the DDIM replay is the run's step, except onto the last, where SDXL's config has
    set_alpha_to_one = False (the scheduler lands on alpha_bar(0), the replay on the clean latent)."""
    data = InstrumentedRun(model, settings(scheduler="ddim")).run_all().data
    for record in data.records:
        inputs = step_inputs(model, data, record.index)
        with torch.no_grad():
            prediction = guided_prediction(model, inputs, inputs.latents)
        torch.testing.assert_close(prediction, record.noise_pred, atol=1e-5, rtol=1e-5)
        if record.next_timestep is not None:
            torch.testing.assert_close(step_from(model, inputs, inputs.latents, prediction), record.next_latents, atol=1e-5, rtol=1e-5)


def test_processors_restored_when_a_run_stops_fails_or_the_denoiser_raises(model, monkeypatch):
    unet = model.denoiser
    before = unet.attn_processors
    steps = InstrumentedRun(model, settings()).steps()
    next(steps)
    assert unet.attn_processors != before
    steps.close()
    assert unet.attn_processors == before
    steps = InstrumentedRun(model, settings()).steps()
    next(steps)
    with pytest.raises(KeyError):
        steps.throw(KeyError("failure inside the run"))
    assert unet.attn_processors == before

    def fail(*args, **kwargs):
        raise RuntimeError("failure inside the denoiser")

    monkeypatch.setattr(unet.mid_block, "forward", fail)
    with pytest.raises(RuntimeError, match="failure inside the denoiser"):
        InstrumentedRun(model, settings()).run_all()
    assert unet.attn_processors == before


def assert_same_records(first, second):
    assert [r.timestep for r in first.records] == [r.timestep for r in second.records]
    for a, b in zip(first.records, second.records):
        for name in ("latents", "next_latents", "x0_hat", "noise_pred"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(a.attention, b.attention)
    assert np.array_equal(first.final_array, second.final_array)


def test_two_threads_give_the_same_records_as_in_sequence(model):
    jobs = [settings(prompt="a cat", seed=1), settings(prompt="a red dog on a circle", seed=2, guidance=7.0, width=48)]
    sequential = [InstrumentedRun(model, job).run_all().data for job in jobs]
    parallel = [InstrumentedRun(model, job) for job in jobs]
    threads = [threading.Thread(target=one.run_all) for one in parallel]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(sequential, parallel):
        assert_same_records(one, other.data)


def test_every_method_is_covered_here():
    assert {name for name, _ in CASES} == set(METHODS)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_every_method_gives_a_finite_map_that_is_not_flat(model, run, name, options):
    first = METHODS[name](**options).explain(model, run, STEP)
    again = METHODS[name](**options).explain(model, run, STEP)
    assert first.method == name and first.timestep == run.records[STEP - 1].timestep
    assert first.saliency.shape == (8, 8) and first.saliency.dtype == np.float32
    assert np.isfinite(first.saliency).all() and first.saliency.min() >= 0 and first.saliency.max() <= 1
    assert np.ptp(first.saliency) > 0
    assert np.array_equal(first.saliency, again.saliency)
    if name == "df-cam":
        layers = set(cam_layers(model))
        assert set(first.per_layer) == layers and {"down_blocks.0.resnets.0", "mid_block.attentions.0", "up_blocks.2.resnets.1"} <= layers
    if name == "relevance":
        assert set(first.token_scores) == {f"{i}:{w}" for i, w in enumerate(run.tokens.word_texts)}


@pytest.mark.parametrize("name", ["df-cam", "relevance", "df-rise"])
def test_no_hook_or_processor_left_after_a_method_or_an_error(model, run, monkeypatch, name):
    pipe = model.pipe
    modules = [m for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in part.modules()]
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)  # noqa: E731
    processors, count = model.denoiser.attn_processors, hooks()
    options = {"n_masks": 4, "batch_size": 4} if name == "df-rise" else {}
    METHODS[name](**options).explain(model, run, STEP)
    assert model.denoiser.attn_processors == processors and hooks() == count

    def fail(*args, **kwargs):
        raise RuntimeError("failure inside the denoiser")

    monkeypatch.setattr(model.denoiser.up_blocks[1], "forward", fail)
    with pytest.raises(RuntimeError, match="failure inside"):
        METHODS[name](**options).explain(model, run, STEP)
    monkeypatch.undo()
    assert model.denoiser.attn_processors == processors and hooks() == count


def test_relevance_rebuilds_the_conditioning_and_its_hooks_do_not_change_the_model(model, run):
    pipe, inputs = model.pipe, step_inputs(model, run, STEP)
    ids = torch.tensor([run.tokens.ids])
    with torch.no_grad():
        rebuilt = SDXL.encode_ids(pipe, ids, inputs.conditioning)  # as encode_prompt built it, bit for bit
        stock = guided_prediction(model, inputs, inputs.latents)
    assert all(torch.equal(rebuilt.tensors[name], inputs.conditioning.tensors[name]) for name in inputs.conditioning.tensors)
    state = RelevanceState(conditional_index=1, batch_size=2, rectify="abs")
    with relevance_hooks(model, state), torch.enable_grad():
        ours = SDXL.encode_ids(pipe, ids, inputs.conditioning)
        output = guided_prediction(model, inputs, inputs.latents)
        ours_text = ours.tensors["encoder_hidden_states"]
        assert ours_text.requires_grad and not ours.tensors["text_embeds"].requires_grad  # the second encoder's part is kept
    assert [layer["kind"] for layer in state.denoiser_layers] == ["self", "cross"] * 11
    assert len(state.text_layers) == 3  # the first encoder's (CLIP-L's), whose tokens the prompt's positions are
    for name, tensor in inputs.conditioning.tensors.items():
        torch.testing.assert_close(ours.tensors[name], tensor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output, stock, atol=1e-5, rtol=1e-5)


def test_a_half_precision_model_decodes_with_an_upcast_vae_and_gives_the_float32_maps(model, run):
    """As the app loads every model on a GPU (float16; CPU float16 here): the VAE, force_upcast in its
    config, decodes in float32 from the first decode on and stays there; dtype slips show up now."""
    pipe = tiny_sdxl_pipeline().to(dtype=torch.float16)
    half = LoadedModel.from_pipeline(pipe, config.TINY_SDXL_MODEL_ID, spec=SPEC)  # the preview fit decodes once
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    half_run = InstrumentedRun(half, run.settings).run_all().data
    assert np.abs(half_run.final_array - run.final_array).max() < 0.05
    assert all(np.isfinite(r.attention.astype(np.float32)).all() for r in half_run.records)
    for name, options in [("relevance", {}), ("df-cam", {}), ("df-rise", {"n_masks": 8, "batch_size": 3})]:
        full = METHODS[name](**options).explain(model, run, STEP).saliency
        saliency = METHODS[name](**options).explain(half, run, STEP).saliency
        assert np.isfinite(saliency).all() and np.corrcoef(full.ravel(), saliency.ravel())[0, 1] > 0.9, f"{name} {options}"


def test_the_models_own_euler_is_scaled_by_model_input_but_a_run_refuses_it(model):
    """SDXL ships Euler, whose input is x / sqrt(sigma^2 + 1): ``replay.model_input`` scales as the
    pipeline does, on a fresh scheduler and on every call alike. A run steps by DDIM or DPM-Solver++
    (Euler's latents are x0 + sigma eps, not the DDPM latents the estimates and methods take), and
    asking for Euler is refused, naming the choices."""
    euler = EulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    euler.set_timesteps(4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    index = 2
    timestep, sigma = euler.timesteps[index], float(euler.sigmas[index])
    fresh = EulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    fresh.set_timesteps(4)
    first = model_input(fresh, latents, timestep, halves=2)
    again = model_input(fresh, latents, timestep, halves=2)
    assert first.shape == (2, 4, 8, 8) and torch.equal(first, again)
    torch.testing.assert_close(first, torch.cat([latents] * 2) / (sigma**2 + 1) ** 0.5)
    with pytest.raises(ValueError, match=r"scheduler must be one of \('dpm\+\+', 'ddim'\), got 'euler'"):
        InstrumentedRun(model, settings(scheduler="euler"))


def test_rebuilt_and_randomised_keep_the_pipeline_and_change_the_picture(model, run):
    randomised = model.randomised(seed=1)
    assert randomised.family is SDXL and randomised.pipe.config.force_zeros_for_empty_prompt
    assert randomised.pipe.text_encoder_2 is model.pipe.text_encoder_2 and randomised.denoiser is not model.denoiser
    data = InstrumentedRun(randomised, run.settings).run_all().data
    assert np.isfinite(data.final_array).all() and not np.array_equal(data.final_array, run.final_array)


def test_sizes_that_are_not_whole_latent_pixels_are_refused(model):
    with pytest.raises(ValueError, match="multiples of 8"):
        SDXL.latent_size(model.pipe, 68, 64)


def test_the_config_reaches_tiny_sdxl_and_refuses_sdxl_base_with_what_it_needs(monkeypatch):
    loaded = load_model(config.TINY_SDXL_MODEL_ID)
    assert loaded.family.name == "sdxl" and loaded.spec is SPEC and not SPEC.hub and not SPEC.needs_gpu
    base = config.MODELS["stabilityai/stable-diffusion-xl-base-1.0"]
    assert base.family == "sdxl" and base.hub and base.needs_gpu and not base.gated
    assert (base.width, base.height, base.steps, base.guidance) == (1024, 1024, 30, 5.0)
    assert base.latent_rgb is None  # the preview map is fitted to its VAE at load
    with pytest.raises(ValueError, match="needs a GPU"):
        load_model(base.id)
    from explainer import models

    monkeypatch.setattr(models, "preferred_device", lambda: (torch.device("cuda"), torch.float16))  # a GPU machine
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1\)"):
        load_model(base.id)

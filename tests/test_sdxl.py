"""The Stable Diffusion XL family on a tiny SDXL-shaped model: its conditioning (two text encoders, the
pooled embedding and the added time ids passed as the pipeline passes them), its cross-attention maps
at several resolutions against an independent computation, the DDIM replay, the VAE's upcast, and what
the model's own Euler scheduler means here. The contract every family keeps (the run equals the
pipeline, capture, every method, relevance through the first encoder) is tested in test_families.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler

from explainer import config
from explainer.capture import AttentionRecorder, capture_attention
from explainer.families import FAMILIES
from explainer.families.sdxl import added_time_ids
from explainer.families.sdxl_tiny import POOLED_WIDTH, tiny_sdxl_pipeline
from explainer.models import LoadedModel, load_model
from explainer.replay import guided_prediction, model_input, step_from, step_inputs
from explainer.run import InstrumentedRun, RunSettings

PROMPT = "a cat on a red circle"
STEP = 3
SDXL = FAMILIES["sdxl"]
SPEC = config.MODELS[config.TINY_SDXL_MODEL_ID]


def settings(**changes):
    base = dict(prompt=PROMPT, steps=4, guidance=5.0, width=64, height=64, seed=3)
    return RunSettings(**(base | changes))


@pytest.fixture(scope="module")
def model():
    return LoadedModel.from_pipeline(tiny_sdxl_pipeline(), config.TINY_SDXL_MODEL_ID, spec=SPEC)


@pytest.fixture(scope="module")
def run(model):
    return InstrumentedRun(model, settings()).run_all().data


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
    averaged, padding summed, upsampled from the layer's grid to the finest layer's (4x4: the first
    level has no attention); averaged over the layers."""
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
        expected.append(F.interpolate(rows.T.reshape(1, -1, side, side), size=(4, 4), mode="bilinear", align_corners=False)[0])
    np.testing.assert_allclose(maps, torch.stack(expected).mean(0).numpy(), atol=2e-3)  # float16 records


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


def test_a_half_precision_pipeline_keeps_its_vae_in_float32():
    """As the app loads every model on a GPU (float16; CPU float16 here): the VAE, force_upcast in its
    config, decodes in float32 from the first decode on (the half-precision run and its maps: test_families.py)."""
    pipe = tiny_sdxl_pipeline().to(dtype=torch.float16)
    LoadedModel.from_pipeline(pipe, config.TINY_SDXL_MODEL_ID, spec=SPEC)  # the preview fit decodes once
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16


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


def test_the_config_refuses_sdxl_base_with_what_it_needs(monkeypatch):
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

"""The Stable Diffusion 3 family on a tiny SD3-shaped model: its joint-attention maps against an independent
computation, the schedules under flow matching and its shift, T5's zero tokens, its layer grid and sizes.
The contract every family keeps (the run equals the pipeline, flow matching's estimates and steps,
capture, every method, relevance) is tested in test_families.py."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from explainer import config
from explainer.capture import AttentionRecorder, capture_attention
from explainer.families import FAMILIES
from explainer.families.sd3_tiny import tiny_sd3_pipeline
from explainer.models import LoadedModel, load_model
from explainer.replay import guided_prediction, step_inputs
from explainer.run import InstrumentedRun, RunSettings
from explainer.schedules import flow_sigmas

PROMPT = "a cat on a red circle"
STEP = 3
SD3 = FAMILIES["sd3"]
SPEC = config.MODELS[config.TINY_SD3_MODEL_ID]


def settings(**changes):
    base = dict(prompt=PROMPT, steps=4, guidance=5.0, width=64, height=64, seed=3)
    return RunSettings(**(base | changes))


@pytest.fixture(scope="module")
def model():
    return LoadedModel.from_pipeline(tiny_sd3_pipeline(), config.TINY_SD3_MODEL_ID, spec=SPEC)


@pytest.fixture(scope="module")
def run(model):
    return InstrumentedRun(model, settings()).run_all().data


class KeepingJointProcessor:
    """The stock joint attention, keeping the probabilities it implies (computed here independently)."""

    def __init__(self, kept, layer):
        self.kept, self.layer, self.stock = kept, layer, JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        def heads(x):  # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim)
            return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

        image_query = attn.norm_q(heads(attn.to_q(hidden_states)))
        keys = torch.cat([attn.norm_k(heads(attn.to_k(hidden_states))), attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))], 2)
        probs = (image_query @ keys.transpose(-1, -2) / image_query.shape[-1] ** 0.5).softmax(-1)  # (batch, heads, N, N + L)
        self.kept[self.layer] = (probs, hidden_states.shape[1])
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask)


def test_recorded_maps_are_the_image_to_text_block_renormalised(model, run):
    """Against an independent computation: per layer, the conditional image queries' attention to the
    text keys divided by its sum, heads averaged, padding summed, on the patch grid."""
    inputs = step_inputs(model, run, STEP)
    transformer, kept_positions = model.denoiser, run.tokens.stored_positions
    sites = SD3.cross_attention_sites(transformer)
    with torch.no_grad(), capture_attention(model):
        recorder = AttentionRecorder(SD3, (8, 8), kept_positions, conditional_index=1, batch_size=2, sites=sites)
        guided_prediction(model, inputs, inputs.latents, recorder=recorder)
        share = recorder.text_share()
        maps, _ = recorder.finish_step()
    kept, originals = {}, transformer.attn_processors
    try:
        transformer.set_attn_processor({key: KeepingJointProcessor(kept, key) if key in sites else proc for key, proc in originals.items()})
        with torch.no_grad():
            guided_prediction(model, inputs, inputs.latents)
    finally:
        transformer.set_attn_processor(originals)
    expected_maps, expected_share = [], []
    for probs, image_tokens in kept.values():
        to_text = probs[1, :, :, image_tokens:]  # the conditional half, (heads, N, L)
        renormalised = (to_text / to_text.sum(-1, keepdim=True)).mean(0)
        rows = torch.cat([renormalised[:, :kept_positions], renormalised[:, kept_positions:].sum(1, keepdim=True)], 1)
        expected_maps.append(rows.T.reshape(-1, 4, 4))
        expected_share.append(to_text.sum(-1).mean(0).reshape(4, 4))
    np.testing.assert_allclose(maps, torch.stack(expected_maps).mean(0).numpy(), atol=2e-3)  # float16 records
    np.testing.assert_allclose(share, torch.stack(expected_share).mean(0).numpy(), atol=2e-3)


@pytest.mark.parametrize("schedule", ["uniform", "early", "latter", [999, 800, 600, 350, 120, 20]])
def test_schedules_map_onto_sigma_before_the_shift(model, schedule):
    data = InstrumentedRun(model, settings(steps=6, schedule=schedule, concentration=10)).run_all().data
    shift = model.pipe.scheduler.config.shift
    if schedule != "uniform":  # uniform is the pipeline's own (test_families.py: test_final_image_equals_the_plain_pipeline)
        shifted = [shift * s / (1 + (shift - 1) * s) for s in flow_sigmas(schedule, 6, 10)]
        np.testing.assert_allclose(data.noise_levels, shifted, rtol=1e-6)
    assert data.noise_levels[0] == 1.0 and all(a > b for a, b in zip(data.noise_levels, data.noise_levels[1:]))
    assert data.timesteps == pytest.approx([1000 * s for s in data.noise_levels])
    assert [r.next_timestep for r in data.records] == data.timesteps[1:] + [None]


def test_the_three_schedules_are_distinct_and_concentrate_where_they_say():
    sigmas = {kind: flow_sigmas(kind, 6, 10) for kind in ("early", "latter")}
    sigmas["uniform"] = list(np.linspace(1.0, 0.001, 6))  # the scheduler's own, before the shift
    assert flow_sigmas("uniform", 6, 10) is None and flow_sigmas("early", 6, 0) is None  # the scheduler's own
    assert len({tuple(np.round(s, 6)) for s in sigmas.values()}) == 3
    for values in sigmas.values():
        assert values[0] == 1.0 and values[-1] > 0 and all(a > b for a, b in zip(values, values[1:]))
    assert np.mean(sigmas["early"]) > np.mean(sigmas["uniform"]) > np.mean(sigmas["latter"])


def test_max_sequence_length_comes_from_the_spec():
    pipe = tiny_sd3_pipeline()
    lengths = {}
    for length in (8, 1, None):
        spec = dataclasses.replace(SPEC, max_sequence_length=length)
        conditioning = LoadedModel.from_pipeline(pipe, "tiny-sd3", spec=spec).encode(PROMPT, "", guided=True)
        text, pooled = conditioning.tensors["encoder_hidden_states"], conditioning.tensors["pooled_projections"]
        lengths[length] = text.shape[1] - 77
        assert text.shape[::2] == (2, 48) and pooled.shape == (2, 40)
        assert not text[:, 77:].any()  # no T5 encoder: zero tokens
        assert not text[:, :77, 40:].any() and text[:, :77, :40].any()  # both CLIP encoders' states, then padding
    assert lengths == {8: 8, 1: 1, None: 256}  # None: the pipeline's own default


def test_grid_groups_and_sizes():
    assert SD3.layer_grid(16, (8, 8)) == (4, 4) and SD3.layer_grid(64, (8, 8)) == (8, 8) and SD3.layer_grid(8, (4, 8)) == (2, 4)
    with pytest.raises(ValueError, match="Cannot place 7 image tokens"):
        SD3.layer_grid(7, (8, 8))
    sites = [f"transformer_blocks.{i}.attn.processor" for i in range(24)]
    labels = [SD3.layer_group(site, (32, 32), sites) for site in sites]
    assert list(dict.fromkeys(labels)) == ["blocks 0–7", "blocks 8–15", "blocks 16–23"]


@pytest.mark.parametrize("width, message", [(72, "multiples of 16"), (256, "at most 128")])
def test_sizes_the_transformer_cannot_take_are_refused(model, width, message):
    with pytest.raises(ValueError, match=message):
        InstrumentedRun(model, settings(width=width))


def test_the_config_refuses_sd35_with_what_it_needs(monkeypatch):
    medium = config.MODELS["stabilityai/stable-diffusion-3.5-medium"]
    assert medium.family == "sd3" and medium.hub and medium.needs_gpu and medium.gated and medium.width == 1024
    from explainer import models

    monkeypatch.setattr(models, "preferred_device", lambda: (torch.device("cuda"), torch.float16))  # a GPU machine
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1\).*needs a Hugging Face token \(HF_TOKEN\) of an account"):
        load_model(medium.id)

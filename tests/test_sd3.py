"""The Stable Diffusion 3 family on a tiny SD3-shaped model: the run equals the pipeline, flow matching's
estimates and steps, joint-attention capture, every method, the schedules under flow matching."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import JointAttnProcessor2_0
from test_methods import CASES, IDS

from explainer import config
from explainer.capture import AttentionRecorder, capture_attention
from explainer.families import FAMILIES
from explainer.families.sd3_tiny import tiny_sd3_pipeline
from explainer.methods import METHODS, cam_layers
from explainer.methods.relevance import RelevanceState, relevance_hooks
from explainer.models import LoadedModel, load_model
from explainer.replay import guided_prediction, noise_from, step_from, step_inputs
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


def pipeline_image(pipe, schedule, steps, concentration):
    sigmas = flow_sigmas(schedule, steps, concentration)
    return pipe(
        PROMPT, num_inference_steps=steps, sigmas=sigmas, guidance_scale=5.0, width=64, height=64,
        generator=torch.Generator().manual_seed(3), output_type="np", max_sequence_length=SPEC.max_sequence_length,
    ).images[0]


@pytest.mark.parametrize("schedule, dynamic", [("uniform", False), ("early", False), ("latter", False), ("uniform", True)])
def test_final_image_equals_the_plain_pipeline(schedule, dynamic):
    """Capture must not change the generation: same noise, same sigmas (shift included), same Euler steps."""
    pipe = tiny_sd3_pipeline()
    if dynamic:  # a resolution-dependent shift: mu from the image's token count, as the pipeline computes it
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    model = LoadedModel.from_pipeline(pipe, config.TINY_SD3_MODEL_ID, spec=SPEC)
    instrumented = InstrumentedRun(model, settings(steps=5, schedule=schedule, concentration=10)).run_all()
    expected = pipeline_image(pipe, schedule, 5, 10)
    assert instrumented.data.timesteps == pipe.scheduler.timesteps.tolist()  # the pipeline's own, after its call
    assert np.abs(expected - instrumented.data.final_array).max() <= 1e-4


def test_each_step_is_euler_and_the_estimates_invert_the_flow(model, run):
    """x0_hat = x - sigma v, eps_hat = x + (1 - sigma) v, x_next = x + (sigma_next - sigma) v; replayed alike."""
    sigmas = [r.sigma for r in run.records] + [0.0]
    assert sigmas[0] == 1.0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert run.noise_levels == sigmas[:-1] and run.records[0].label == "step 1 of 4, t = 1000"
    for record, sigma, next_sigma in zip(run.records, sigmas, sigmas[1:]):
        assert record.alpha_bar == pytest.approx((1 - sigma) ** 2)
        velocity = record.noise_pred
        torch.testing.assert_close(record.x0_hat, record.latents - sigma * velocity, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(record.next_latents, record.latents + (next_sigma - sigma) * velocity, atol=1e-5, rtol=1e-5)
        inputs = step_inputs(model, run, record.index)
        with torch.no_grad():
            prediction = guided_prediction(model, inputs, inputs.latents)
        torch.testing.assert_close(prediction, velocity, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_from(model, inputs, inputs.latents, prediction), record.next_latents, atol=1e-5, rtol=1e-5)
        noise = noise_from(model, inputs, inputs.latents, prediction)
        torch.testing.assert_close((1 - sigma) * record.x0_hat + sigma * noise, record.latents, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_joint_maps_sum_to_one_over_the_text_and_the_text_share_is_a_fraction(model, guidance):
    data = InstrumentedRun(model, settings(guidance=guidance, per_group=True)).run_all().data
    for record in data.records:
        assert record.attention.shape == (data.tokens.stored_positions + 1, 8, 8) and record.attention.dtype == np.float16
        assert np.abs(record.attention.astype(np.float32).sum(0) - 1).max() <= 1e-3  # the padding row included
        assert record.text_share.shape == (8, 8) and record.text_share.dtype == np.float16
        assert 0 < record.text_share.min() and record.text_share.max() < 1
        for maps in record.group_attention.values():
            assert np.abs(maps.astype(np.float32).sum(0) - 1).max() <= 1e-3
    assert data.attention_groups == {f"block {i}": [f"transformer_blocks.{i}.attn.processor"] for i in range(3)}


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
    text keys divided by its sum, heads averaged, padding summed, upsampled from the patch grid."""
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
        expected_maps.append(F.interpolate(rows.T.reshape(1, -1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)[0])
        part = to_text.sum(-1).mean(0).reshape(1, 1, 4, 4)
        expected_share.append(F.interpolate(part, size=(8, 8), mode="bilinear", align_corners=False)[0, 0])
    np.testing.assert_allclose(maps, torch.stack(expected_maps).mean(0).numpy(), atol=2e-3)  # float16 records
    np.testing.assert_allclose(share, torch.stack(expected_share).mean(0).numpy(), atol=2e-3)


def test_recording_processor_matches_the_stock_one_and_only_joint_sites_are_swapped(model, run):
    inputs = step_inputs(model, run, STEP)
    transformer = model.denoiser
    before = transformer.attn_processors
    with torch.no_grad():
        stock = guided_prediction(model, inputs, inputs.latents)
        with capture_attention(model) as sites:
            installed = transformer.attn_processors
            unrecorded = guided_prediction(model, inputs, inputs.latents)
            recorder = AttentionRecorder(SD3, (8, 8), 5, conditional_index=1, batch_size=2, sites=sites)
            recorded = guided_prediction(model, inputs, inputs.latents, recorder=recorder)
    assert sites == [f"transformer_blocks.{i}.attn.processor" for i in range(3)]
    kinds = {key: type(proc).__name__ for key, proc in installed.items()}
    assert kinds == {**{site: "JointAttentionRecordingProcessor" for site in sites}, "transformer_blocks.0.attn2.processor": "RecorderPassthrough"}
    assert torch.equal(unrecorded, stock)
    torch.testing.assert_close(recorded, stock, atol=1e-5, rtol=1e-5)
    assert transformer.attn_processors == before


def test_processors_restored_when_a_run_stops_fails_or_the_denoiser_raises(model, monkeypatch):
    transformer = model.denoiser
    before = transformer.attn_processors
    steps = InstrumentedRun(model, settings()).steps()
    next(steps)
    assert transformer.attn_processors != before
    steps.close()
    assert transformer.attn_processors == before
    steps = InstrumentedRun(model, settings()).steps()
    next(steps)
    with pytest.raises(KeyError):
        steps.throw(KeyError("failure inside the run"))
    assert transformer.attn_processors == before

    def fail(*args, **kwargs):
        raise RuntimeError("failure inside the denoiser")

    monkeypatch.setattr(transformer.transformer_blocks[1], "forward", fail)
    with pytest.raises(RuntimeError, match="failure inside the denoiser"):
        InstrumentedRun(model, settings()).run_all()
    assert transformer.attn_processors == before


def assert_same_records(first, second):
    assert [r.timestep for r in first.records] == [r.timestep for r in second.records]
    for a, b in zip(first.records, second.records):
        for name in ("latents", "next_latents", "x0_hat", "noise_pred"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(a.attention, b.attention) and np.array_equal(a.text_share, b.text_share)
    assert np.array_equal(first.final_array, second.final_array)


def test_two_threads_give_the_same_records_as_in_sequence(model):
    jobs = [settings(prompt="a cat", seed=1), settings(prompt="a red dog on a circle", seed=2, guidance=7.0)]
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
        assert set(first.per_layer) == set(cam_layers(model)) == {f"transformer_blocks.{i}" for i in range(3)}
    if name == "relevance":
        assert set(first.token_scores) == {f"{i}:{w}" for i, w in enumerate(run.tokens.word_texts)}


def test_a_half_precision_model_runs_and_gives_the_float32_maps(model, run):
    """As the app loads every model on a GPU (float16; CPU float16 here): dtype slips show up now."""
    half = LoadedModel.from_pipeline(tiny_sd3_pipeline().to(dtype=torch.float16), config.TINY_SD3_MODEL_ID, spec=SPEC)
    half_run = InstrumentedRun(half, run.settings).run_all().data
    assert np.abs(half_run.final_array - run.final_array).max() < 0.05
    assert all(np.isfinite(r.attention.astype(np.float32)).all() and np.isfinite(r.text_share).all() for r in half_run.records)
    for name, options in CASES:
        full = METHODS[name](**options).explain(model, run, STEP).saliency
        saliency = METHODS[name](**options).explain(half, run, STEP).saliency
        assert np.isfinite(saliency).all() and np.corrcoef(full.ravel(), saliency.ravel())[0, 1] > 0.9, f"{name} {options}"


@pytest.mark.parametrize("name", ["df-cam", "relevance", "df-rise"])
def test_no_hook_or_processor_left_after_a_method_or_an_error(model, run, monkeypatch, name):
    modules = [m for part in (model.pipe.transformer, model.pipe.text_encoder) for m in part.modules()]
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)  # noqa: E731
    processors, count = model.denoiser.attn_processors, hooks()
    options = {"n_masks": 4, "batch_size": 4} if name == "df-rise" else {}
    METHODS[name](**options).explain(model, run, STEP)
    assert model.denoiser.attn_processors == processors and hooks() == count

    def fail(*args, **kwargs):
        raise RuntimeError("failure inside the denoiser")

    monkeypatch.setattr(model.denoiser.transformer_blocks[2], "forward", fail)
    with pytest.raises(RuntimeError, match="failure inside"):
        METHODS[name](**options).explain(model, run, STEP)
    monkeypatch.undo()
    assert model.denoiser.attn_processors == processors and hooks() == count


def test_relevance_rebuilds_the_conditioning_and_its_hooks_do_not_change_the_model(model, run):
    pipe, inputs = model.pipe, step_inputs(model, run, STEP)
    ids = torch.tensor([run.tokens.ids])
    with torch.no_grad():
        rebuilt = SD3.encode_ids(pipe, ids, inputs.conditioning)  # as encode_prompt built it, bit for bit
        stock = guided_prediction(model, inputs, inputs.latents)
    assert all(torch.equal(rebuilt.tensors[name], inputs.conditioning.tensors[name]) for name in inputs.conditioning.tensors)
    state = RelevanceState(conditional_index=1, batch_size=2, rectify="abs")
    with relevance_hooks(model, state), torch.enable_grad():
        ours_text = SD3.encode_ids(pipe, ids, inputs.conditioning)
        ours = guided_prediction(model, inputs, inputs.latents)
    assert [layer["kind"] for layer in state.denoiser_layers] == ["joint", "self", "joint", "joint"]  # block 0 has two
    assert len(state.text_layers) == 2  # CLIP-L's, the encoder the prompt's tokens come from
    for name, tensor in inputs.conditioning.tensors.items():
        torch.testing.assert_close(ours_text.tensors[name], tensor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["uniform", "early", "latter", [999, 800, 600, 350, 120, 20]])
def test_schedules_map_onto_sigma_before_the_shift(model, schedule):
    data = InstrumentedRun(model, settings(steps=6, schedule=schedule, concentration=10)).run_all().data
    shift = model.pipe.scheduler.config.shift
    if schedule != "uniform":  # uniform is the pipeline's own (test_final_image_equals_the_plain_pipeline)
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


def test_the_config_reaches_tiny_sd3_and_refuses_sd35_with_what_it_needs(monkeypatch):
    loaded = load_model(config.TINY_SD3_MODEL_ID)
    assert loaded.family.name == "sd3" and loaded.spec is SPEC and not SPEC.hub and not SPEC.needs_gpu
    medium = config.MODELS["stabilityai/stable-diffusion-3.5-medium"]
    assert medium.family == "sd3" and medium.hub and medium.needs_gpu and medium.gated and medium.width == 1024
    from explainer import models

    monkeypatch.setattr(models, "preferred_device", lambda: (torch.device("cuda"), torch.float16))  # a GPU machine
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1\).*needs a Hugging Face token \(HF_TOKEN\) of an account"):
        load_model(medium.id)

"""The FLUX.1 family on a tiny FLUX-shaped model: no guidance half and FLUX.1-dev's guidance input, its
attention maps in double- and single-stream blocks (text first) against an independent computation,
the region view, T5's words, the resolution-dependent shift, packed latents. The contract every family
keeps (the run equals the pipeline, flow matching's estimates and steps, capture, every method, token
relevance through T5) is tested in test_families.py."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from test_families import FLUX_SITES as SITES

from explainer import config, run as run_module
from explainer.capture import AttentionRecorder, capture_attention
from explainer.families import FAMILIES
from explainer.families.flux import pack, resolution_shift, unpack
from explainer.families.flux_tiny import t5_tokenizer, tiny_flux_pipeline
from explainer.methods import SpotAttention
from explainer.models import LoadedModel, load_model
from explainer.render import views
from explainer.replay import guided_prediction, step_inputs
from explainer.run import InstrumentedRun, RunSettings
from explainer.schedules import flow_sigmas

PROMPT = "a cat on a red circle"
STEP = 3
FLUX = FAMILIES["flux"]
SPEC = config.MODELS[config.TINY_FLUX_MODEL_ID]
TEXT_LENGTH = SPEC.max_sequence_length


def settings(**changes):
    base = dict(prompt=PROMPT, steps=4, guidance=0.0, width=64, height=64, seed=3)
    return RunSettings(**(base | changes))


@pytest.fixture(scope="module")
def model():
    """FLUX.1-schnell's shape: no guidance input."""
    return LoadedModel.from_pipeline(tiny_flux_pipeline(), config.TINY_FLUX_MODEL_ID, spec=SPEC)


@pytest.fixture(scope="module")
def run(model):
    return InstrumentedRun(model, settings()).run_all().data


@pytest.fixture(scope="module")
def dev_model():
    """FLUX.1-dev's shape: the guidance scale is an input (an embedding)."""
    return LoadedModel.from_pipeline(tiny_flux_pipeline(guidance_embeds=True), config.TINY_FLUX_MODEL_ID, spec=SPEC)


@pytest.fixture(scope="module")
def dev_run(dev_model):
    return InstrumentedRun(dev_model, settings(guidance=3.5)).run_all().data


def test_guidance_is_never_a_second_half_and_an_input_only_where_the_model_takes_one(model, dev_model, dev_run, monkeypatch):
    made = []

    class SpyRecorder(AttentionRecorder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(run_module, "AttentionRecorder", SpyRecorder)
    runs = {(name, w): InstrumentedRun(loaded, settings(guidance=w)).run_all().data
            for name, loaded in (("schnell", model), ("dev", dev_model)) for w in (1.0, 3.5)}
    assert [(r.conditional_index, r.batch_size) for r in made] == [(0, 1)] * 4  # one half, at every scale
    assert not any(FLUX.guided(w) for w in (0.0, 1.0, 3.5, 30.0))
    same = [torch.equal(a.latents, b.latents) for a, b in zip(runs["schnell", 1.0].records, runs["schnell", 3.5].records)]
    assert all(same)  # schnell takes no guidance at all
    assert not torch.equal(runs["dev", 1.0].records[-1].latents, runs["dev", 3.5].records[-1].latents)
    conditioning = dev_model.encode(PROMPT, "", guided=False, guidance=3.5).tensors
    assert conditioning["guidance"].dtype == torch.float32 and conditioning["guidance"].tolist() == [3.5]
    assert "guidance" not in model.encode(PROMPT, "", guided=False, guidance=3.5).tensors
    assert dev_model.encode(PROMPT, "", guided=True, guidance=2.0).tensors["guidance"].tolist() == [2.0, 2.0]
    inputs = step_inputs(dev_model, dev_run, STEP)
    assert inputs.conditioning.tensors["guidance"].tolist() == [3.5] and not inputs.guided
    with torch.no_grad():  # a batch of latents: one row of guidance each
        batch = guided_prediction(dev_model, inputs, inputs.latents.repeat(3, 1, 1, 1))
        torch.testing.assert_close(batch, dev_run.records[STEP - 1].noise_pred.repeat(3, 1, 1, 1), atol=1e-5, rtol=1e-5)
        without = dev_model.encode(PROMPT, "", guided=False)
        with pytest.raises(ValueError, match="takes the guidance scale as an input"):
            FLUX.predict(dev_model.pipe, inputs.latents, inputs.timestep, without)


class KeepingFluxProcessor:
    """The stock FLUX attention, keeping the probabilities it implies (computed here independently, in
    FLUX's own token order [text; image])."""

    def __init__(self, kept, layer):
        self.kept, self.layer, self.stock = kept, layer, FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):  # (batch, tokens, heads * dim) -> (batch, tokens, heads, dim)
            return x.view(x.shape[0], x.shape[1], attn.heads, -1)

        query, key = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        if encoder_hidden_states is not None:
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], 1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], 1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1).transpose(1, 2)
        self.kept[self.layer] = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1)  # (batch, heads, T, T)
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def kept_probabilities(model, inputs):
    """Every layer's probabilities in FLUX's order, by the stock processor's inputs."""
    transformer, kept = model.denoiser, {}
    originals = transformer.attn_processors
    try:
        transformer.set_attn_processor({key: KeepingFluxProcessor(kept, key) for key in originals})
        with torch.no_grad():
            guided_prediction(model, inputs, inputs.latents)
    finally:
        transformer.set_attn_processor(originals)
    return kept


def test_recorded_maps_are_the_image_to_text_block_renormalised(dev_model, dev_run):
    """Against an independent computation: per layer, the image queries' attention to the text keys (the
    text in FRONT of the image in FLUX's order) divided by its sum, heads averaged, padding summed,
    kept on the packed grid; double- and single-stream blocks alike."""
    inputs = step_inputs(dev_model, dev_run, STEP)
    kept_positions = dev_run.tokens.stored_positions
    with torch.no_grad(), capture_attention(dev_model) as sites:
        recorder = AttentionRecorder(FLUX, (8, 8), kept_positions, conditional_index=0, batch_size=1, sites=sites)
        guided_prediction(dev_model, inputs, inputs.latents, recorder=recorder)
        share = recorder.text_share()
        maps, _ = recorder.finish_step()
    kept = kept_probabilities(dev_model, inputs)
    assert list(kept) == SITES == sites
    expected_maps, expected_share = [], []
    for probs in kept.values():
        to_text = probs[0, :, TEXT_LENGTH:, :TEXT_LENGTH]  # image queries (after the text), text keys: (heads, N, L)
        renormalised = (to_text / to_text.sum(-1, keepdim=True)).mean(0)
        rows = torch.cat([renormalised[:, :kept_positions], renormalised[:, kept_positions:].sum(1, keepdim=True)], 1)
        expected_maps.append(rows.T.reshape(-1, 4, 4))
        expected_share.append(to_text.sum(-1).mean(0).reshape(4, 4))
    np.testing.assert_allclose(maps, torch.stack(expected_maps).mean(0).numpy(), atol=2e-3)  # float16 records
    np.testing.assert_allclose(share, torch.stack(expected_share).mean(0).numpy(), atol=2e-3)


def test_a_spot_looks_where_its_image_to_image_attention_goes(dev_model, dev_run):
    """The region view: the spot's attention over the image keys (renormalised), heads and the four
    blocks averaged, from the packed grid; its words read from the record."""
    row, column = 5, 2
    found = SpotAttention(row=row, column=column).explain(dev_model, dev_run, STEP)
    kept = kept_probabilities(dev_model, step_inputs(dev_model, dev_run, STEP))
    query = (row // 2) * 4 + column // 2
    maps = []
    for probs in kept.values():
        to_image = probs[0, :, TEXT_LENGTH + query, TEXT_LENGTH:].mean(0)  # (N,): the spot's token over the image keys
        maps.append(F.interpolate((to_image / to_image.sum()).reshape(1, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)[0, 0])
    expected = torch.stack(maps).mean(0).numpy()
    expected = (expected - expected.min()) / np.ptp(expected)
    np.testing.assert_allclose(found.saliency, expected, atol=1e-4)
    shares = dev_run.records[STEP - 1].attention[:, row // 2, column // 2].astype(np.float32)  # the packed grid's cell
    assert found.token_scores == {f"{i}:{w.text}": pytest.approx(float(shares[list(w.positions)].sum()))
                                  for i, w in enumerate(dev_run.tokens.words)}
    assert found.denoiser_calls == 1


def test_t5_pieces_join_into_the_prompts_words():
    """A word begins at a piece marked "▁" (sentencepiece's word start); punctuation stands alone; an
    unknown character reads as typed; no start token, T5's end token after the last piece."""
    prompt = "a cat on a red circle, bicycle 😀 Xy!"  # 15 pieces: the end token fills the 16th place
    tokens = FLUX.tokenize(tiny_flux_pipeline(), prompt, max_sequence_length=TEXT_LENGTH)
    assert tokens.word_texts == ["a", "cat", "on", "a", "red", "circle", ",", "bicycle", "😀", "Xy", "!"]
    assert [w.pieces for w in tokens.words][5:] == [("▁cir", "cle"), (",",), ("▁bicy", "cle"), ("▁", "<unk>"), ("▁X", "y"), ("!",)]
    assert [w.positions for w in tokens.words][:7] == [(0,), (1,), (2,), (3,), (4,), (5, 6), (7,)]
    assert tokens.start_position is None and not tokens.has_start and tokens.end_position == 15 == tokens.stored_positions - 1
    tokenizer = t5_tokenizer()
    assert list(tokens.ids) == tokenizer(prompt, padding="max_length", max_length=TEXT_LENGTH, truncation=True).input_ids
    assert tokens.ids[tokens.end_position] == tokenizer.eos_token_id and tokens.find("Circle") == 5
    short = FLUX.tokenize(tiny_flux_pipeline(), "a red circle", max_sequence_length=TEXT_LENGTH)
    assert short.ids[short.end_position + 1:] == (tokenizer.pad_token_id,) * (TEXT_LENGTH - 5) and short.truncated == ""


def test_a_long_prompt_is_cut_where_t5_cuts_it():
    tokens = FLUX.tokenize(tiny_flux_pipeline(), "a cat on " * 6, max_sequence_length=TEXT_LENGTH)
    assert tokens.end_position == TEXT_LENGTH - 1 and len(tokens.ids) == TEXT_LENGTH
    assert tokens.word_texts == ["a", "cat", "on"] * 5  # 15 pieces and the end token
    assert tokens.truncated == "a cat on" and "limit of 15 tokens" in tokens.truncation_message


def test_the_words_view_has_no_start_token_and_its_rows_still_sum_to_one(run):
    labels = views.token_labels(run, include_special=True)
    assert labels == [*run.tokens.word_texts, views.END, views.PADDING]
    total = sum(views.word_map(run, i, [run.records[0]], include_special=True) for i in range(len(labels)))
    np.testing.assert_allclose(total, 1.0, atol=2e-3)


@pytest.mark.parametrize("schedule", ["uniform", "early", "latter", [999, 800, 600, 350, 120, 20]])
def test_schedules_map_onto_sigma_before_the_resolution_shift(model, schedule):
    data = InstrumentedRun(model, settings(steps=6, schedule=schedule, concentration=10)).run_all().data
    mu = resolution_shift(16, model.pipe.scheduler.config)  # 4x4 packed tokens
    assert mu == calculate_shift(16, 256, 4096, 0.5, 1.15)  # the pipeline's, to the last bit
    unshifted = flow_sigmas(schedule, 6, 10) or list(np.linspace(1.0, 1 / 6, 6))  # uniform: the pipeline's spacing
    shifted = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in unshifted]
    np.testing.assert_allclose(data.noise_levels, shifted, rtol=1e-6)
    assert data.noise_levels[0] == 1.0 and all(a > b for a, b in zip(data.noise_levels, data.noise_levels[1:]))
    assert data.timesteps == pytest.approx([1000 * s for s in data.noise_levels])
    assert [r.next_timestep for r in data.records] == data.timesteps[1:] + [None]


def test_the_shift_grows_with_the_picture():
    config_ = tiny_flux_pipeline().scheduler.config
    assert resolution_shift(256, config_) == pytest.approx(0.5) and resolution_shift(4096, config_) == pytest.approx(1.15)
    assert resolution_shift(64 * 64, config_) > resolution_shift(32 * 32, config_)


def test_latents_pack_into_2x2_patches_as_the_pipeline_packs_them():
    latents = torch.randn(3, 4, 8, 6)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 4, 8, 6)) and packed.shape == (3, 12, 16)
    assert torch.equal(unpack(packed, 8, 6), latents)
    assert torch.equal(unpack(packed, 8, 6), FluxPipeline._unpack_latents(packed, 64, 48, 8))


def test_max_sequence_length_comes_from_the_spec():
    pipe = tiny_flux_pipeline()
    for length in (16, 8, None):
        loaded = LoadedModel.from_pipeline(pipe, "tiny-flux", spec=dataclasses.replace(SPEC, max_sequence_length=length))
        conditioning = loaded.encode(PROMPT, "", guided=True)
        expected = length or 512  # None: the pipeline's own default
        assert conditioning.tensors["encoder_hidden_states"].shape == (2, expected, 24)
        assert conditioning.tensors["pooled_projections"].shape == (2, 16)
        assert len(loaded.tokenize(PROMPT).ids) == expected


def test_grid_groups_and_sizes(model):
    assert FLUX.layer_grid(16, (8, 8)) == (4, 4) and FLUX.layer_grid(8, (4, 8)) == (2, 4)
    with pytest.raises(ValueError, match="64 image tokens are not the 2x2 patches"):
        FLUX.layer_grid(64, (8, 8))
    sites = [f"transformer_blocks.{i}.attn.processor" for i in range(19)]
    sites += [f"single_transformer_blocks.{i}.attn.processor" for i in range(38)]
    labels = [FLUX.layer_group(site, (64, 64), sites) for site in sites]
    assert list(dict.fromkeys(labels)) == ["double blocks 0–18", "single blocks 0–18", "single blocks 19–37"]
    assert [FLUX.layer_group(site, (4, 4), SITES) for site in SITES] == ["double blocks 0–1"] * 2 + ["single block 0", "single block 1"]
    assert FLUX.latent_channels(model.pipe) == 4 and FLUX.latent_size(model.pipe, 96, 64) == (8, 12)


def test_sizes_that_are_not_whole_patches_are_refused(model):
    with pytest.raises(ValueError, match="multiples of 16"):
        InstrumentedRun(model, settings(width=72))


def test_the_config_refuses_schnell_with_what_it_needs(monkeypatch):
    schnell = config.MODELS["black-forest-labs/FLUX.1-schnell"]
    assert schnell.family == "flux" and schnell.hub and schnell.needs_gpu and not schnell.gated
    assert (schnell.width, schnell.height, schnell.steps, schnell.guidance, schnell.max_sequence_length) == (1024, 1024, 4, 0.0, 256)
    from explainer import models

    monkeypatch.setattr(models, "preferred_device", lambda: (torch.device("cuda"), torch.float16))  # a GPU machine
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1\)") as refused:
        load_model(schnell.id)
    assert "token" not in str(refused.value)  # Apache 2.0: not gated
    loads = []

    class Loading:
        def load(self, source, device, dtype, local_files_only):
            loads.append((source, dtype))
            return source

    monkeypatch.setattr(models, "family_named", lambda name: Loading())
    models._build_pipeline(schnell)
    models._build_pipeline(config.MODELS["stabilityai/stable-diffusion-3.5-medium"])
    assert loads == [(schnell.id, torch.bfloat16), ("stabilityai/stable-diffusion-3.5-medium", torch.float16)]

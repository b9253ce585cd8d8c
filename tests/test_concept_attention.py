"""ConceptAttention on the MM-DiTs (the SD 3 family; FLUX.1's double-stream blocks, schnell's shape and
dev's guidance input): concepts ride the text stream read-only (the image is the model's own, bit for
bit), the stream mirrors the text stream exactly, and the maps are shares over the concepts."""

from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explainer import config
from explainer.families.flux import pack
from explainer.families.flux_tiny import tiny_flux_pipeline
from explainer.methods import ConceptAttention
from explainer.methods.concept_attention import _concept_states, _ConceptStream
from explainer.models import LoadedModel, load_model
from explainer.replay import raw_prediction, step_inputs
from explainer.run import InstrumentedRun, RunSettings

CASES = ["sd3", "flux", "flux-dev"]


@cache
def build(case):
    """(model, its run), built once: SD 3 guided (two halves), FLUX.1-schnell's shape (one half, no guidance input),
    FLUX.1-dev's (one half, the guidance scale an input)."""
    if case == "sd3":
        model, guidance = load_model(config.TINY_SD3_MODEL_ID), 5.0
    elif case == "flux":
        model, guidance = load_model(config.TINY_FLUX_MODEL_ID), 0.0
    else:
        spec = config.MODELS[config.TINY_FLUX_MODEL_ID]
        model, guidance = LoadedModel.from_pipeline(tiny_flux_pipeline(guidance_embeds=True), spec.id, spec=spec), 3.5
    settings = RunSettings(prompt="a cat", steps=4, guidance=guidance, width=64, height=64, seed=1)
    return model, InstrumentedRun(model, settings).run_all().data


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return build(request.param)


@pytest.fixture(scope="module")
def sd3():
    return build("sd3")


def test_concepts_not_in_the_prompt_leave_the_generated_image_bit_identical(case):
    model, run = case
    blocks = list(model.denoiser.transformer_blocks)  # FLUX: the double-stream blocks
    stream = _ConceptStream(_concept_states(model, ("dog", "red")), step_inputs(model, run, 1).conditioning.halves - 1,
                            run.latent_size, model.family, chosen=set(range(len(blocks))))
    with torch.no_grad(), stream.riding(blocks):
        riding = InstrumentedRun(model, run.settings).run_all().data  # the concepts ride along every step
    np.testing.assert_array_equal(riding.final_array, run.final_array)
    assert len(stream.output_maps) == 4 * len(blocks)  # they did ride, through the joint-attention blocks only
    inputs = step_inputs(model, run, 2)
    with torch.no_grad():
        before = raw_prediction(model, inputs, inputs.latents)
        ConceptAttention(concepts=("dog", "red")).explain(model, run, 2)
        assert torch.equal(raw_prediction(model, inputs, inputs.latents), before)


def test_the_concept_stream_mirrors_the_text_stream_exactly(case):
    """With the prompt's own text tokens as the concepts, the concepts attend over exactly what the
    text attends over (FLUX: with the text's rotary positions), so their states after every block are
    the text's."""
    model, run = case
    inputs = step_inputs(model, run, 2)
    conditional = inputs.conditioning.halves - 1
    blocks = list(model.denoiser.transformer_blocks)
    with torch.no_grad():
        text = model.denoiser.context_embedder(inputs.conditioning.tensors["encoder_hidden_states"][conditional])
    stream = _ConceptStream(text, conditional, run.latent_size, model.family, chosen=set())
    text_after, concepts_after = [], []
    ride = stream._ride

    def ride_and_keep(block, index):
        ride(block, index)
        concepts_after.append(stream.states.clone())

    stream._ride = ride_and_keep
    handles = [block.register_forward_hook(lambda module, args, output: text_after.append(output[0])) for block in blocks]
    try:
        with torch.no_grad(), stream.riding(blocks):
            raw_prediction(model, inputs, inputs.latents)
    finally:
        for handle in handles:
            handle.remove()
    # SD 3's last block updates no text (context_pre_only); FLUX's double-stream blocks all do
    mirrored = blocks[:-1] if model.family.name == "sd3" else blocks
    assert len(concepts_after) == len(blocks) and len(mirrored) >= 1
    for index, _ in enumerate(mirrored):
        assert not torch.equal(concepts_after[index], text)  # the block moved them
        torch.testing.assert_close(concepts_after[index], text_after[index][conditional], atol=2e-5, rtol=1e-4)


def test_the_maps_are_the_concepts_shares_of_every_spot(case):
    model, run = case
    found = ConceptAttention(concepts=("cat", "dog", "red")).explain(model, run, 2)
    assert list(found.token_maps) == ["0:cat", "1:dog", "2:red"] and found.denoiser_calls == 1
    total = sum(found.token_maps.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert all(m.shape == run.latent_size == (8, 8) for m in found.token_maps.values())
    assert all(np.isfinite(m).all() and np.ptp(m) > 0 for m in found.token_maps.values())
    assert set(found.per_layer) == set(found.token_maps) and abs(sum(found.token_scores.values()) - 1) < 1e-5
    assert found.saliency.shape == run.latent_size
    late = ConceptAttention(concepts=("cat", "dog"), blocks="last half").explain(model, run, 2)
    assert not np.allclose(late.token_maps["0:cat"], ConceptAttention(concepts=("cat", "dog")).explain(model, run, 2).token_maps["0:cat"])


def test_flux_maps_lie_on_the_packed_grid_where_the_attention_maps_do():
    """A FLUX image token is a 2x2 latent patch (``pack``'s order): a per-token value comes out over that
    patch, upsampled from the packed grid as the recorded attention maps are."""
    model, run = build("flux")
    stream = _ConceptStream(torch.zeros(1, 4), 0, run.latent_size, model.family, chosen=set())
    height, width = run.latent_size
    for row, column in ((0, 0), (1, 2), (3, 1)):
        latents = torch.zeros(1, 1, height, width)
        latents[0, 0, 2 * row:2 * row + 2, 2 * column:2 * column + 2] = 1
        token = int(pack(latents)[0, :, 0].argmax())  # where pack put that patch
        per_token = torch.zeros(height * width // 4, 1)
        per_token[token] = 1
        placed = stream._on_grid(per_token)[0]
        assert placed.shape == run.latent_size
        patch = torch.zeros_like(placed, dtype=torch.bool)
        patch[2 * row:2 * row + 2, 2 * column:2 * column + 2] = True
        assert placed[patch].min() > placed[~patch].max()  # the patch holds the token's value, above any other cell
        expected = F.interpolate(per_token.T.reshape(1, 1, height // 2, width // 2), size=run.latent_size,
                                 mode="bilinear", align_corners=False)[0, 0]
        assert torch.equal(placed, expected)


def test_a_bfloat16_flux_gives_the_float32_maps():
    """FLUX loads in bfloat16 on a GPU: the maps are still shares (computed in float32) and close to the
    float32 model's."""
    model, run = build("flux")
    half = LoadedModel.from_pipeline(tiny_flux_pipeline().to(dtype=torch.bfloat16), model.id, spec=model.spec)
    full = ConceptAttention(concepts=("cat", "dog")).explain(model, run, 2)
    found = ConceptAttention(concepts=("cat", "dog")).explain(half, run, 2)
    total = sum(found.token_maps.values())
    assert total.dtype == np.float32 and np.isfinite(total).all()
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert max(np.abs(found.token_maps[k] - full.token_maps[k]).max() for k in full.token_maps) < 0.05


def test_concept_attention_says_what_it_needs(sd3, tiny_model):
    model, run = sd3
    unet_run = InstrumentedRun(tiny_model, RunSettings(prompt="a cat", steps=2, width=64, height=64)).run_all().data
    with pytest.raises(ValueError, match=r"needs a model whose blocks attend jointly .*SD 3 and FLUX\.1 families"):
        ConceptAttention(concepts=("cat",)).explain(tiny_model, unet_run, 2)
    with pytest.raises(ValueError, match="A concept is one word"):
        ConceptAttention(concepts=("red cat",)).explain(model, run, 2)
    flux, flux_run = build("flux")
    with pytest.raises(ValueError, match="A concept is one word"):
        ConceptAttention(concepts=("red cat",)).explain(flux, flux_run, 2)
    with pytest.raises(ValueError, match="concepts must be one or more words"):
        ConceptAttention(concepts=())
    with pytest.raises(ValueError, match="blocks must be one of"):
        ConceptAttention(blocks="first")

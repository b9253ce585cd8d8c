"""ConceptAttention on the SD 3 family: concepts ride the text stream read-only (the image is the
model's own, bit for bit), the stream mirrors the text stream exactly, and the maps are shares over
the concepts."""

import numpy as np
import pytest
import torch

from explainer import config
from explainer.methods import ConceptAttention
from explainer.methods.concept_attention import _ConceptStream
from explainer.models import load_model
from explainer.replay import raw_prediction, step_inputs
from explainer.run import InstrumentedRun, RunSettings


@pytest.fixture(scope="module")
def model():
    return load_model(config.TINY_SD3_MODEL_ID)


@pytest.fixture(scope="module")
def run(model):
    return InstrumentedRun(model, RunSettings(prompt="a cat", steps=4, guidance=5.0, width=64, height=64, seed=1)).run_all().data


def test_concepts_not_in_the_prompt_leave_the_generated_image_bit_identical(model, run):
    concepts = ConceptAttention(concepts=("dog", "red"))
    states = torch.zeros(2, model.denoiser.config.caption_projection_dim)
    stream = _ConceptStream(states, 1, run.latent_size, model.family, chosen=set(range(len(model.denoiser.transformer_blocks))))
    with torch.no_grad(), stream.riding(list(model.denoiser.transformer_blocks)):
        riding = InstrumentedRun(model, run.settings).run_all().data  # the concepts ride along every step
    np.testing.assert_array_equal(riding.final_array, run.final_array)
    assert len(stream.output_maps) == 4 * len(model.denoiser.transformer_blocks)  # they did ride
    inputs = step_inputs(model, run, 2)
    with torch.no_grad():
        before = raw_prediction(model, inputs, inputs.latents)
        concepts.explain(model, run, 2)
        assert torch.equal(raw_prediction(model, inputs, inputs.latents), before)


def test_the_concept_stream_mirrors_the_text_stream_exactly(model, run):
    """With the prompt's own text tokens as the concepts, the concepts attend over exactly what the
    text attends over, so their states after every block are the text's."""
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
    for index, block in enumerate(blocks[:-1]):  # the last block updates no text (context_pre_only)
        torch.testing.assert_close(concepts_after[index], text_after[index][conditional], atol=2e-5, rtol=1e-4)


def test_the_maps_are_the_concepts_shares_of_every_spot(model, run):
    found = ConceptAttention(concepts=("cat", "dog", "red")).explain(model, run, 2)
    assert list(found.token_maps) == ["0:cat", "1:dog", "2:red"] and found.denoiser_calls == 1
    total = sum(found.token_maps.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert all(m.shape == run.latent_size for m in found.token_maps.values())
    assert set(found.per_layer) == set(found.token_maps) and abs(sum(found.token_scores.values()) - 1) < 1e-5
    late = ConceptAttention(concepts=("cat", "dog"), blocks="last half").explain(model, run, 2)
    assert not np.allclose(late.token_maps["0:cat"], ConceptAttention(concepts=("cat", "dog")).explain(model, run, 2).token_maps["0:cat"])


def test_concept_attention_says_what_it_needs(model, run, tiny_model):
    unet_run = InstrumentedRun(tiny_model, RunSettings(prompt="a cat", steps=2, width=64, height=64)).run_all().data
    with pytest.raises(ValueError, match="needs a model whose blocks attend jointly"):
        ConceptAttention(concepts=("cat",)).explain(tiny_model, unet_run, 2)
    with pytest.raises(ValueError, match="A concept is one word"):
        ConceptAttention(concepts=("red cat",)).explain(model, run, 2)
    with pytest.raises(ValueError, match="concepts must be one or more words"):
        ConceptAttention(concepts=())
    with pytest.raises(ValueError, match="blocks must be one of"):
        ConceptAttention(blocks="first")

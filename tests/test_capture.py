import threading

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from explainer.capture import AttentionRecorder, CrossAttentionRecordingProcessor, RecorderPassthrough, capture_attention
from explainer.families import FAMILIES

SD1 = FAMILIES["sd1"]
layer_grid, layer_group, cross_attention_layers = SD1.layer_grid, SD1.layer_group, SD1.cross_attention_sites


def unet_inputs(model, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    unet = model.pipe.unet
    latents = torch.randn(batch, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor(500), text


def test_recording_processor_matches_the_stock_one(tiny_model):
    """Drift test: our explicit-softmax path gives the fused kernel's output."""
    unet = tiny_model.pipe.unet
    latents, timestep, text = unet_inputs(tiny_model)
    with torch.inference_mode():
        stock = unet(latents, timestep, encoder_hidden_states=text).sample
        with capture_attention(tiny_model):
            recorder = AttentionRecorder(SD1, (8, 8), kept_positions=5, conditional_index=1, batch_size=2)
            captured = unet(latents, timestep, encoder_hidden_states=text, cross_attention_kwargs={"recorder": recorder}).sample
            passthrough = unet(latents, timestep, encoder_hidden_states=text).sample
    torch.testing.assert_close(captured, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(passthrough, stock)
    maps, _ = recorder.finish_step()
    assert maps.shape == (6, 8, 8)


def test_only_cross_attention_is_swapped_and_originals_come_back(tiny_model):
    unet = tiny_model.pipe.unet
    before = unet.attn_processors
    layers = cross_attention_layers(unet)
    assert layers and all(".attn2." in key for key in layers)
    with capture_attention(tiny_model):
        inside = unet.attn_processors
        for key, processor in inside.items():
            if key in layers:
                assert isinstance(processor, CrossAttentionRecordingProcessor)
            else:  # self-attention keeps the fused kernel
                assert isinstance(processor, RecorderPassthrough)
                assert isinstance(processor.original, AttnProcessor2_0)
    assert unet.attn_processors == before


def test_originals_restored_after_an_exception(tiny_model):
    unet = tiny_model.pipe.unet
    before = unet.attn_processors
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny_model):
            raise RuntimeError("boom")
    assert unet.attn_processors == before


def test_overlapping_blocks_share_one_installation(tiny_model):
    unet = tiny_model.pipe.unet
    before = unet.attn_processors
    entered, release = threading.Event(), threading.Event()

    def other_user():
        with capture_attention(tiny_model):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=other_user)
    thread.start()
    entered.wait(5)
    with capture_attention(tiny_model):
        pass
    # the other block is still open: our exit must not pull its processors away
    assert isinstance(unet.attn_processors[cross_attention_layers(unet)[0]], CrossAttentionRecordingProcessor)
    release.set()
    thread.join()
    assert unet.attn_processors == before


def test_recorder_explains_a_missing_capture():
    recorder = AttentionRecorder(SD1, (8, 8), kept_positions=3, conditional_index=0, batch_size=1)
    with pytest.raises(RuntimeError, match="No cross-attention was captured"):
        recorder.finish_step()


@pytest.mark.parametrize(
    "tokens, latent, expected", [(64, (8, 8), (8, 8)), (16, (8, 8), (4, 4)), (25, (9, 10), (5, 5)), (12, (5, 7), (3, 4))]
)
def test_layer_grid(tokens, latent, expected):
    assert layer_grid(tokens, latent) == expected


def test_layer_grid_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="Cannot place"):
        layer_grid(7, (8, 8))


class LayerKeepingRecorder(AttentionRecorder):
    """The slow reference: keeps every layer's raw probabilities."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw = {}

    def add(self, layer, probs, heads):
        self.raw[layer] = (probs.clone(), heads)
        super().add(layer, probs, heads)


def layer_maps_from_probs(probs, heads, kept, latent_size):
    """One layer's (kept + 1, h, w) map written straight from docs/methods.md (Cross-attention maps): conditional half, head mean."""
    conditional = probs.view(2, heads, *probs.shape[1:])[1].mean(0)  # (N, L)
    rows = torch.cat([conditional[:, :kept], conditional[:, kept:].sum(1, keepdim=True)], 1).T
    return rows.reshape(kept + 1, *layer_grid(probs.shape[1], latent_size))


def record_one_call(model, max_group_side):
    unet = model.pipe.unet
    latents, timestep, text = unet_inputs(model)
    recorder = LayerKeepingRecorder(SD1, (8, 8), kept_positions=5, conditional_index=1, batch_size=2,
                                    per_group=True, max_group_side=max_group_side)
    with torch.inference_mode(), capture_attention(model):
        unet(latents, timestep, encoder_hidden_states=text, cross_attention_kwargs={"recorder": recorder})
    references = {layer: layer_maps_from_probs(probs, heads, 5, (8, 8)) for layer, (probs, heads) in recorder.raw.items()}
    return recorder, *recorder.finish_step(), references


def test_group_maps_are_the_mean_of_their_layers(tiny_model):
    recorder, _, groups, references = record_one_call(tiny_model, max_group_side=32)
    assert sorted(k for keys in recorder.groups.values() for k in keys) == sorted(cross_attention_layers(tiny_model.pipe.unet))
    assert len(groups) < len(references)  # the tiny UNet has two layers in some groups
    for label, keys in recorder.groups.items():
        assert all(layer_group(k, references[k].shape[1:]) == label for k in keys)
        expected = torch.stack([references[k] for k in keys]).mean(0)
        assert groups[label].dtype == np.float16 and groups[label].shape == tuple(expected.shape)
        np.testing.assert_allclose(groups[label].astype(np.float32), expected.numpy(), atol=1e-3)
        np.testing.assert_allclose(groups[label].astype(np.float32).sum(0), 1.0, atol=3e-3)


def test_group_maps_larger_than_the_limit_are_area_pooled(tiny_model):
    _, _, full, _ = record_one_call(tiny_model, max_group_side=32)
    _, _, pooled, _ = record_one_call(tiny_model, max_group_side=2)
    for label, values in full.items():
        values = values.astype(np.float32)
        height, width = values.shape[1:]
        if height <= 2:
            np.testing.assert_array_equal(pooled[label], full[label])
            continue
        blocks = values.reshape(values.shape[0], 2, height // 2, 2, width // 2).mean(axis=(2, 4))
        assert pooled[label].shape == blocks.shape
        np.testing.assert_allclose(pooled[label].astype(np.float32), blocks, atol=1e-3)
        np.testing.assert_allclose(pooled[label].astype(np.float32).sum(0), 1.0, atol=3e-3)

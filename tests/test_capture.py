import threading

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from explainer.capture import (
    AttentionRecorder,
    CrossAttentionRecordingProcessor,
    RecorderPassthrough,
    capture_attention,
    cross_attention_layers,
    layer_grid,
)


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
        with capture_attention(unet):
            recorder = AttentionRecorder((8, 8), kept_positions=5, conditional_index=1, batch_size=2)
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
    with capture_attention(tiny_model.pipe):
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
        with capture_attention(unet):
            raise RuntimeError("boom")
    assert unet.attn_processors == before


def test_overlapping_blocks_share_one_installation(tiny_model):
    unet = tiny_model.pipe.unet
    before = unet.attn_processors
    entered, release = threading.Event(), threading.Event()

    def other_user():
        with capture_attention(unet):
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=other_user)
    thread.start()
    entered.wait(5)
    with capture_attention(unet):
        pass
    # the other block is still open: our exit must not pull its processors away
    assert isinstance(unet.attn_processors[cross_attention_layers(unet)[0]], CrossAttentionRecordingProcessor)
    release.set()
    thread.join()
    assert unet.attn_processors == before


def test_recorder_explains_a_missing_capture():
    recorder = AttentionRecorder((8, 8), kept_positions=3, conditional_index=0, batch_size=1)
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

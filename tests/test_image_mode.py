"""Image mode: a picture the model did not make, read with clear refusals, encoded, noised at every step
or inverted, and explained by the same records, views and methods as a generation."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_families import FLUX, SD3, SDXL

from explainer import config
from explainer.image_mode import ImageRun, encode_image, read_image
from explainer.methods import METHODS
from explainer.models import load_model
from explainer.run import RunSettings
from explainer.shapes.world import generate_scene

SCENE = generate_scene(7, split="any", n_shapes=1)  # a small green triangle at the top


def tiny_settings(guidance=1.0, **changes):
    return RunSettings(**(dict(prompt="a cat on a red circle", steps=4, guidance=guidance, width=64, height=64, seed=3) | changes))


# --- reading a picture


def not_an_image(tmp_path: Path) -> str:
    path = tmp_path / "notes.png"
    path.write_bytes(b"these are not the pixels you are looking for")
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: None, "No image"),
    (not_an_image, "not an image that can be read"),
    (lambda tmp: Image.new("RGB", (1, 1)), "each side must be at least 8"),
    (lambda tmp: Image.new("I;16", (64, 64)), "pixel mode 'I;16'"),
    (lambda tmp: np.zeros((64, 64, 3), np.float32), "must be uint8"),
], ids=["none", "not-an-image", "1x1", "16-bit", "float-array"])
def test_what_cannot_be_explained_is_refused_with_its_rule(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        read_image(make(tmp_path), 64, 64)


def test_a_picture_with_too_many_pixels_is_refused_before_its_pixels_are_read(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    small = dataclasses.replace(config.LIMITS, max_image_pixels=50_000)
    with pytest.raises(ValueError, match="300×200 = 60,000 pixels; the limit is 50,000"):
        read_image(str(path), 64, 64, small)


def test_transparency_is_flattened_and_another_size_resized_each_with_a_message():
    rgba = Image.new("RGBA", (128, 96), (255, 0, 0, 0))  # fully transparent red
    picture, messages = read_image(rgba, 64, 64)
    assert picture.mode == "RGB" and picture.size == (64, 64)
    assert np.asarray(picture).min() == 255  # white where nothing was
    assert any("transparency" in m for m in messages) and any("resized from 128×96 to the run's 64×64" in m for m in messages)
    same, none = read_image(SCENE.image, 64, 64)
    assert none == [] and np.array_equal(np.asarray(same), SCENE.image)


# --- trajectories, on the tiny families


@pytest.mark.parametrize("which", ["sd1", "sd3", "flux"])
def test_the_noise_trajectory_is_the_picture_noised_to_every_steps_level(tiny_model, which):
    model = tiny_model if which == "sd1" else {"sd3": SD3, "flux": FLUX}[which].load()
    run = ImageRun(model, tiny_settings(guidance=SD3.guidance if which == "sd3" else 1.0), SCENE.image, "noise")
    data = run.run_all().data
    clean = encode_image(model, data.source_image)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    for record in data.records:
        expected = model.family.noised(run.scheduler, clean, noise, record.timestep)
        torch.testing.assert_close(record.latents.float(), expected, atol=1e-5, rtol=0)
    assert len({float(r.latents.std()) for r in data.records}) == len(data.records)  # one level per step
    assert data.source["mode"] == "noise" and len(data.source["sha256"]) == 64
    assert data.reproduction["source"] == data.source


@pytest.mark.parametrize("tiny", [SD3, FLUX], ids=["sd3", "flux"])
def test_denoising_the_inverted_latent_lands_back_on_the_pictures_latent(tiny):
    """Flow matching's Euler step run backwards, refined to its fixed point, is the run's own step inverted.
    (The tiny random DDPM models' predictions are too steep for the fixed point; the trained embedded model's
    is tested below.)"""
    model = tiny.load()
    run = ImageRun(model, tiny_settings(guidance=tiny.guidance), SCENE.image, "invert", refinements=4).run_all()
    clean = encode_image(model, run.data.source_image)
    landed = run.data.records[-1].next_latents.float()
    assert (landed - clean).abs().max() < 0.05 * clean.abs().max()
    unrefined = ImageRun(model, tiny_settings(guidance=tiny.guidance), SCENE.image, "invert", refinements=0).run_all()
    assert (landed - clean).abs().max() < 0.5 * (unrefined.data.records[-1].next_latents.float() - clean).abs().max()


@pytest.mark.parametrize("tiny", [SD3, SDXL], ids=["sd3", "sdxl"])
def test_encoding_a_picture_is_what_decoding_inverts(tiny):
    """A latent decoded and encoded again is the same latent (up to the tiny VAE's error): scale and shift
    are undone in the right order."""
    model = tiny.load()
    latents = torch.randn(1, model.family.latent_channels(model.pipe), 8, 8) * 0.5
    pixels = torch.from_numpy(model.decode(latents, output_type="np")).permute(0, 3, 1, 2) * 2 - 1
    again = model.family.encode_pictures(model.pipe, pixels)
    assert again.shape == latents.shape and torch.isfinite(again).all()


def test_every_method_explains_a_step_of_an_image_run(tiny_model):
    data = ImageRun(tiny_model, tiny_settings(), SCENE.image, "noise").run_all().data
    for name, method in METHODS.items():
        options = {"n_masks": 8, "batch_size": 8} if name == "df-rise" else {"n_samples": 8, "batch_size": 8} if name == "df-lime" else {}
        if name == "concept-attention":
            continue  # MM-DiT families only (test_concept_attention.py)
        found = method(**options).explain(tiny_model, data, 2)
        assert found.saliency.shape == data.latent_size and np.isfinite(found.saliency).all(), name


# --- on the trained embedded models: the picture comes back, and the word is found on the shape


@pytest.fixture(scope="module", params=config.EMBEDDED_MODEL_IDS)
def embedded(request):
    if config.weights_missing(config.MODELS[request.param]):
        pytest.skip(f"no weights for {request.param} in assets/")
    return load_model(request.param)


def vae_round_trip_error(model, picture) -> float:
    again = model.decode(encode_image(model, picture).float(), output_type="np")[0]
    return float(np.abs(again - np.asarray(picture, np.float32) / 255).mean())


def test_inverting_a_rendered_scene_and_regenerating_it_reproduces_it(embedded):
    """Within the VAE's own round-trip error plus 0.01 (mean over pixels in [0, 1]), at guidance 1."""
    settings = RunSettings(prompt=SCENE.caption, steps=embedded.spec.steps, guidance=1.0, width=64, height=64)
    data = ImageRun(embedded, settings, SCENE.image, "invert").run_all().data
    floor = vae_round_trip_error(embedded, data.source_image)
    assert data.source["reconstruction_error"] <= floor + 0.01, (data.source["reconstruction_error"], floor)


def test_on_the_noise_trajectory_the_model_finds_the_shape(embedded):
    """The UNet's noun attends to the shape (its ground phase trained that); the MM-DiT's noun does not (nothing
    trained it: its model card), but its image tokens over the shape attend to the text more than elsewhere."""
    from explainer.render.views import word_map

    settings = RunSettings(prompt=SCENE.caption, steps=embedded.spec.steps, guidance=1.0, width=64, height=64)
    data = ImageRun(embedded, settings, SCENE.image, "noise").run_all().data
    late = data.records[len(data.records) // 2:]
    shape = Image.fromarray(SCENE.shapes[0].mask.astype(np.uint8) * 255)
    mask = np.asarray(shape.resize(data.latent_size[::-1], Image.Resampling.BOX)) > 127
    if embedded.family.architecture == "UNet":
        values = word_map(data, data.tokens.word_texts.index(SCENE.shapes[0].shape), late)
    else:
        values = np.mean([record.text_share.astype(np.float32) for record in late], axis=0)
    assert values[mask].mean() > 1.5 * values[~mask].mean()


def test_an_image_runs_export_holds_the_picture_and_its_source(tiny_model, tmp_path):
    import json
    import zipfile

    from explainer import export

    data = ImageRun(tiny_model, tiny_settings(), SCENE.image, "noise").run_all().data
    with zipfile.ZipFile(export.export_zip(data, tmp_path / "run.zip")) as opened:
        assert np.array_equal(np.asarray(Image.open(opened.open("source.png"))), SCENE.image)
        assert json.loads(opened.read("run.json"))["reproduction"]["source"]["mode"] == "noise"

"""explainer.cost: the work of one denoiser evaluation and one VAE decode, counted on the meta device,
and the ZeroGPU durations built on it (ui.settings, ui.gpu)."""

from types import SimpleNamespace

import pytest
import torch

from explainer import config
from explainer.cost import _built, architecture, count_tflops, step_cost
from explainer.models import load_model

# Each Hub denoiser's size as its model card or paper gives it (parameters, with SD 3.5's stored
# position embedding): a stored architecture that differs from the model's would miss it.
PUBLISHED_SIZES = {
    "CompVis/stable-diffusion-v1-4": 860e6,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 860e6,
    "stabilityai/stable-diffusion-xl-base-1.0": 2.6e9,
    "stabilityai/stable-diffusion-3.5-medium": 2.5e9,
    "black-forest-labs/FLUX.1-schnell": 12e9,
}
HUB_MODELS = [spec.id for spec in config.MODELS.values() if spec.hub]
SDXL, FLUX = "stabilityai/stable-diffusion-xl-base-1.0", "black-forest-labs/FLUX.1-schnell"


def recorded(model_id, steps=None, side=None, guidance=None):
    """What a duration function reads of a run: its records, latent size and settings."""
    spec = config.model_spec(model_id)
    steps, side = steps or spec.steps, side or spec.width
    latent = side // step_cost(model_id).scale
    return SimpleNamespace(records=[None] * steps, latent_size=(latent, latent),
                           settings=SimpleNamespace(width=side, height=side, guidance=spec.guidance if guidance is None else guidance))


def test_every_hub_model_has_a_stored_architecture_of_its_published_size():
    assert set(HUB_MODELS) == set(PUBLISHED_SIZES)
    for model_id in HUB_MODELS:
        denoiser_config, vae_config = architecture(config.model_spec(model_id))
        with torch.device("meta"):
            denoiser, vae = _built(denoiser_config), _built(vae_config)
        size = sum(p.numel() for p in denoiser.parameters()) + sum(b.numel() for b in denoiser.buffers())
        assert size == pytest.approx(PUBLISHED_SIZES[model_id], rel=0.05), model_id
        assert vae.config.latent_channels == (16 if config.model_spec(model_id).family in ("sd3", "flux") else 4)


def test_the_fit_gives_the_count_at_any_size():
    """The quadratic in the pixels, fitted at three square sizes, is what counting at another size gives."""
    cost = step_cost(SDXL)
    for width, height in ((1024, 640),):
        denoiser, decode = count_tflops(SDXL, width, height)
        assert cost.denoiser(width, height) == pytest.approx(denoiser, rel=0.005)
        assert cost.decode(width, height) == pytest.approx(decode, rel=0.005)
    assert cost.denoiser(1024, 1024) > 4 * cost.denoiser(512, 512) > 0  # self-attention grows faster than the pixels


@pytest.mark.parametrize("model_id", [config.TINY_RANDOM_MODEL_ID, config.TINY_SDXL_MODEL_ID, config.TINY_SD3_MODEL_ID,
                                      config.TINY_FLUX_MODEL_ID])
def test_each_familys_example_inputs_drive_its_real_denoiser(model_id):
    """What the count runs on the meta device is a valid call of the family's real denoiser."""
    model, spec = load_model(model_id), config.model_spec(model_id)
    latent_size = model.family.latent_size(model.pipe, spec.width, spec.height)
    inputs = model.family.example_inputs(model.denoiser, latent_size, spec.max_sequence_length)
    with torch.no_grad():
        output = model.denoiser(**inputs, return_dict=False)[0]
    assert output.shape[0] == 1 and torch.isfinite(output).all()
    assert min(count_tflops(model_id, spec.width, spec.height)) > 0


def test_the_assumed_throughput_is_below_the_reference_gpus_peak():
    """Counted work over the published A100 time: a count above the A100's 312 TFLOP/s bfloat16 peak
    would mean the count misses work the timing did."""
    from ui.settings import sustained_tflops

    assert 50 < sustained_tflops() < 312


def test_durations_grow_with_the_work_and_the_guidance_halves():
    from ui import gpu

    sd = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    base = {"steps": 30, "width": 512, "height": 512, "guidance": 7.5}
    seconds = gpu.run_duration(sd, [base])
    assert gpu.run_duration(sd, [base | {"steps": 60}]) > seconds
    assert gpu.run_duration(sd, [base | {"width": 1024, "height": 1024}]) > seconds
    assert gpu.run_duration(sd, [base, base]) > seconds  # a second prompt is a second run
    assert gpu.run_duration(sd, [base | {"guidance": 1.0}]) < seconds  # no unconditional half
    assert gpu.relevance_duration(sd, recorded(sd, 60)) > gpu.relevance_duration(sd, recorded(sd, 30))
    rise = {n: gpu.explain_duration(sd, recorded(sd), "df-rise", {"n_masks": n}, 20, False) for n in (200, 4000)}
    assert rise[4000] > rise[200]
    assert gpu.explain_duration(sd, recorded(sd), "df-rise", {"n_masks": 200}, 20, True) > rise[200]  # + insertion/deletion
    assert gpu.explain_duration(sd, recorded(sd, side=1024), "df-cam", {}, 20, True) > gpu.explain_duration(sd, recorded(sd), "df-cam", {}, 20, True)


def test_a_call_longer_than_zerogpu_takes_is_refused_with_advice_and_a_long_one_is_capped():
    from ui import gpu
    from ui.settings import APP

    with pytest.raises(ValueError, match="more than one GPU call on this Space may take.*fewer masks or samples"):
        gpu.explain_duration(FLUX, recorded(FLUX), "df-lime", {"n_samples": 1000}, 3, True)
    capped = gpu.explain_duration(FLUX, recorded(FLUX), "df-rise", {"n_masks": 200}, 3, True)
    assert capped == APP.max_gpu_seconds  # expected under the cap, the margin over it
    assert gpu.run_duration(FLUX, [{"steps": 4, "width": 1024, "height": 1024, "guidance": 0.0}]) < 60

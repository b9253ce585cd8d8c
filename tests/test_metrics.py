"""Metrics on cases with a known answer (docs/methods.md), and the insertion/deletion curves on the tiny model."""

import numpy as np
import pytest
import torch

from explainer.metrics import (
    auc,
    blur_latents,
    insertion_deletion,
    insertion_deletion_by_distance,
    inside_outside_ratio,
    latent_order,
    spearman,
)
from explainer import metrics
from explainer.run import InstrumentedRun, RunSettings


def test_auc_of_known_curves():
    assert auc([0, 1]) == pytest.approx(0.5)
    assert auc(np.linspace(5, 2, 11)) == pytest.approx(0.5)  # linear, any direction or scale
    assert auc([0, 0, 1, 1, 1]) == pytest.approx(0.625)  # a step: 0.5 * 0.25 + 2 * 0.25
    assert auc([1, 1, 1, 1, 0]) == pytest.approx(0.875)
    assert auc([3, 3, 3]) == 0.0  # constant: nothing to normalise
    curve = np.random.default_rng(0).random(9)
    assert auc(curve) == pytest.approx(auc(7 * curve - 2))  # min-max makes it scale-free
    with pytest.raises(ValueError, match="at least 2 points"):
        auc([1.0])


def test_spearman_of_known_pairs():
    values = np.random.default_rng(1).random((8, 8))
    assert spearman(values, values) == pytest.approx(1.0)
    assert spearman(values, -values) == pytest.approx(-1.0)
    assert spearman(values, np.exp(3 * values)) == pytest.approx(1.0)  # ranks only
    assert np.isnan(spearman(values, np.ones((8, 8))))
    with pytest.raises(ValueError, match="same shape"):
        spearman(values, values[:4])


def test_inside_outside_ratio_of_known_maps():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    assert inside_outside_ratio(1 + 2 * mask, mask) == pytest.approx(3.0)
    assert inside_outside_ratio(np.ones((8, 8)), mask) == pytest.approx(1.0)
    assert inside_outside_ratio(mask.astype(float), mask) == float("inf")
    with pytest.raises(ValueError, match="both inside and outside"):
        inside_outside_ratio(np.ones((8, 8)), np.ones((8, 8), bool))


def test_blur_keeps_constants_and_order_is_descending():
    constant = torch.full((1, 4, 8, 8), 0.7)
    torch.testing.assert_close(blur_latents(constant), constant)
    spike = torch.zeros(1, 1, 11, 11)
    spike[0, 0, 5, 5] = 1
    line = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 5.0**2))
    expected = np.outer(line, line) / line.sum() ** 2  # the 11x11 Gaussian kernel, sigma 5
    np.testing.assert_allclose(blur_latents(spike)[0, 0].numpy(), expected, atol=1e-7)
    saliency = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert latent_order(saliency, (4, 4)).tolist() == list(range(15, -1, -1))
    assert latent_order(np.kron(saliency, np.ones((2, 2))), (4, 4))[0] == 15  # resized to the latent grid first


@pytest.fixture(scope="module")
def ddim_run(tiny_model):
    # a custom list with "ddim" runs DPM-Solver++ of order 1, which is exactly the DDIM update
    schedule = [999, 700, 400, 100]
    settings = RunSettings(prompt="a red circle", guidance=5.0, width=64, height=64, seed=2, scheduler="ddim", schedule=schedule)
    return InstrumentedRun(tiny_model, settings).run_all().data


@pytest.mark.parametrize("distance", ["1-ssim", "mse"])
def test_insertion_deletion_curves_have_known_ends(tiny_model, ddim_run, distance):
    saliency = np.random.default_rng(3).random((8, 8))
    result = insertion_deletion(tiny_model, ddim_run, 2, saliency, distance=distance, batch_size=5)
    assert len(result["insertion"]) == len(result["deletion"]) == 9  # H_lat + 1 states
    assert result["denoiser_calls"] == 4  # 18 states, 5 per pass
    # the fully inserted state and the undeleted state are x_t itself: the DDIM step lands on the real x_{t-1}
    assert result["insertion"][-1] == pytest.approx(0.0, abs=1e-4)
    assert result["deletion"][0] == pytest.approx(0.0, abs=1e-4)
    assert result["insertion"][0] > 0.01 and result["deletion"][-1] > 0.01
    assert 0 <= result["insertion_auc"] <= 1 and 0 <= result["deletion_auc"] <= 1
    other = insertion_deletion(tiny_model, ddim_run, 2, 1 - saliency, distance=distance)
    # the start of insertion (blurred x_t) and the end of deletion (zeros) do not depend on the map
    assert other["insertion"][0] == pytest.approx(result["insertion"][0], abs=1e-5)
    assert other["deletion"][-1] == pytest.approx(result["deletion"][-1], abs=1e-5)


def test_insertion_deletion_batched_equals_one_state_at_a_time(tiny_model, ddim_run):
    saliency = np.random.default_rng(4).random((8, 8))
    fast = insertion_deletion(tiny_model, ddim_run, 3, saliency, distance="mse", batch_size=18)
    slow = insertion_deletion(tiny_model, ddim_run, 3, saliency, distance="mse", batch_size=1)
    assert (fast["denoiser_calls"], slow["denoiser_calls"]) == (1, 18)
    np.testing.assert_allclose(fast["insertion"], slow["insertion"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast["deletion"], slow["deletion"], rtol=1e-4, atol=1e-7)
    # a constant map reveals pixels in row-major order, like a map that decreases along the rows
    flat = insertion_deletion(tiny_model, ddim_run, 3, np.ones((8, 8)), distance="mse")
    ramp = insertion_deletion(tiny_model, ddim_run, 3, -np.arange(64.0).reshape(8, 8), distance="mse")
    np.testing.assert_allclose(flat["deletion"], ramp["deletion"], rtol=1e-6)


def test_all_distances_from_one_pass_equal_one_distance_at_a_time(tiny_model, ddim_run):
    saliency = np.random.default_rng(5).random((8, 8))
    both = insertion_deletion_by_distance(tiny_model, ddim_run, 3, saliency, ("1-ssim", "mse"), batch_size=18)
    assert both["denoiser_calls"] == 1
    for distance in ("1-ssim", "mse"):
        alone = insertion_deletion(tiny_model, ddim_run, 3, saliency, distance=distance, batch_size=18)
        for key in ("insertion", "deletion", "insertion_auc", "deletion_auc"):
            np.testing.assert_allclose(both[distance][key], alone[key], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"distance": "fid"}, "distance must be one of"),
        ({"step": 9}, r"step must be an integer in \[1, 4\]"),
        ({"saliency": np.ones((1, 8, 8))}, "saliency must be a 2-D map"),
        ({"batch_size": 0}, "batch_size must be an integer"),
    ],
)
def test_insertion_deletion_bad_arguments(tiny_model, ddim_run, kwargs, message):
    arguments = {"step": 2, "saliency": np.ones((8, 8)), **kwargs}
    with pytest.raises(ValueError, match=message):
        insertion_deletion(tiny_model, ddim_run, **arguments)


# --- segmentation scores on known answers


def square_mask(size=16):
    mask = np.zeros((size, size), bool)
    mask[4:10, 6:12] = True
    return mask


def test_a_perfect_map_scores_one_on_every_segmentation_measure():
    mask = square_mask()
    scores = metrics.segmentation_scores(mask.astype(np.float32), mask)
    assert scores == {"miou": 1.0, "iou": 1.0, "pixel_accuracy": 1.0, "average_precision": 1.0}


def test_an_inverted_map_scores_zero_iou_and_accuracy_and_the_lowest_precision():
    mask = square_mask()
    scores = metrics.segmentation_scores(1.0 - mask, mask)
    assert scores["miou"] == 0.0 and scores["pixel_accuracy"] == 0.0
    assert scores["average_precision"] == pytest.approx(mask.mean())  # every negative ranked first: one tie, at the base rate


def test_a_constant_map_predicts_all_background():
    mask = square_mask()
    scores = metrics.segmentation_scores(np.full(mask.shape, 0.3, np.float32), mask)
    background = (~mask).mean()
    assert scores["iou"] == 0.0 and scores["miou"] == pytest.approx(background / 2)
    assert scores["pixel_accuracy"] == pytest.approx(background)
    assert scores["average_precision"] == pytest.approx(mask.mean())  # no ranking: precision is the base rate


def test_average_precision_matches_a_hand_computed_ranking():
    # ranked: +, -, +, - : precision 1 at recall 0.5, 2/3 at recall 1
    assert metrics.average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)


def test_a_latent_map_is_brought_to_the_masks_pixels_and_void_pixels_do_not_count():
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    coarse = np.zeros((8, 8), np.float32)
    coarse[:, :4] = 1.0
    assert metrics.segmentation_scores(coarse, mask)["miou"] > 0.9
    valid = np.ones_like(mask)
    valid[:, 28:36] = False  # the blurred border, left out
    assert metrics.segmentation_scores(coarse, mask, valid)["miou"] == 1.0
    with pytest.raises(ValueError, match="both inside and outside"):
        metrics.segmentation_scores(coarse, np.zeros_like(mask))


# --- the in-distribution fill: the model's own inpainting


def test_inpainting_keeps_what_is_kept_and_fills_the_rest_by_denoising(tiny_model, ddim_run):
    from explainer.metrics import inpainted
    from explainer.replay import step_inputs

    inputs = step_inputs(tiny_model, ddim_run, 3)
    half = torch.zeros(1, 1, 8, 8)
    half[..., :4] = 1
    keep = torch.cat([torch.ones(1, 1, 8, 8), half, torch.zeros(1, 1, 8, 8)])
    filled = inpainted(tiny_model, inputs, keep, batch_size=2)
    torch.testing.assert_close(filled[0], inputs.latents[0])  # all kept: x_t itself
    torch.testing.assert_close(filled[1, ..., :4], inputs.latents[0, ..., :4])
    assert not torch.allclose(filled[1, ..., 4:], inputs.latents[0, ..., 4:]) and torch.isfinite(filled).all()
    again = inpainted(tiny_model, inputs, keep, batch_size=3)  # the fill does not depend on how states are batched
    torch.testing.assert_close(again, filled, atol=1e-4, rtol=1e-3)  # batched convolutions round differently
    # nothing kept: a sample of the prompt from the run's first level down to this one, at x_t's scale
    assert 0.5 < float(filled[2].std() / inputs.latents.std()) < 2.0


def test_the_empty_prompts_fill_denoises_with_the_unconditional_half_alone(tiny_model, ddim_run):
    import dataclasses

    from explainer.metrics import inpainted
    from explainer.replay import step_inputs

    inputs = step_inputs(tiny_model, ddim_run, 3)
    keep = torch.zeros(2, 1, 8, 8)
    keep[0, ..., :4] = 1
    empty = inpainted(tiny_model, inputs, keep, batch_size=2, prompt=False)
    with_prompt = inpainted(tiny_model, inputs, keep, batch_size=2)
    torch.testing.assert_close(empty[0, ..., :4], inputs.latents[0, ..., :4])  # what is kept stays
    assert not torch.allclose(empty, with_prompt, atol=1e-3)
    # nothing kept: a sample of the unconditional half alone (the run is guided with the empty negative
    # prompt, so that half is the empty prompt's); where something is kept, it comes from the real x_t
    unconditional = {name: tensor[:1] for name, tensor in inputs.conditioning.tensors.items()}
    alone = dataclasses.replace(inputs, conditioning=type(inputs.conditioning)(unconditional), guided=False)
    torch.testing.assert_close(empty[1], inpainted(tiny_model, alone, keep, batch_size=2)[1], atol=1e-5, rtol=1e-4)


def test_insertion_deletion_with_inpainting_has_known_ends_and_counts_its_calls(tiny_model, ddim_run):
    saliency = np.random.default_rng(0).random((8, 8))
    result = insertion_deletion(tiny_model, ddim_run, 3, saliency, distance="mse", batch_size=6, fill="inpaint")
    assert result["insertion"][-1] == pytest.approx(0, abs=1e-6) and result["deletion"][0] == pytest.approx(0, abs=1e-6)
    assert result["fill"] == "inpaint" and result["denoiser_calls"] == 3 + 1 + 2 * 3  # scoring + estimate + 2 levels x 3 batches
    blurred = insertion_deletion(tiny_model, ddim_run, 3, saliency, distance="mse", batch_size=6)
    assert result["deletion"][1:] != blurred["deletion"][1:]
    with pytest.raises(ValueError, match="fill must be one of"):
        insertion_deletion(tiny_model, ddim_run, 3, saliency, fill="zeros")

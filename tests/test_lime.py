"""DF-LIME's segmentation (issue 20): real segments on small latent grids, the paper's quickshift where
it gives segments, a degenerate segmentation refused instead of a flat map."""

import numpy as np
import pytest
import torch

from explainer.shapes.truth import shape_grid
from explainer.methods import DFLime
from explainer.methods.lime import superpixels
from explainer.metrics import inside_outside_ratio, spearman
from explainer.replay import guided_prediction, step_from, step_inputs
from explainer.run import InstrumentedRun, RunSettings

STEP = 3
SMALL_QUICKSHIFT = {"kernel_size": 1, "max_dist": 5}  # gives several segments on the tiny model's 8x8 grid


@pytest.fixture(scope="module")
def tiny_run(tiny_model):
    settings = RunSettings(prompt="a cat on a red circle", steps=4, guidance=5.0, width=64, height=64, seed=3)
    return InstrumentedRun(tiny_model, settings).run_all().data


@pytest.fixture(scope="module")
def circle_run(embedded_model):
    settings = RunSettings(prompt="a red circle on the left", width=64, height=64, steps=20, guidance=5.0, seed=1)
    return InstrumentedRun(embedded_model, settings).run_all().data


def test_the_default_map_on_a_small_grid_is_not_flat(tiny_model, tiny_run):
    """The paper's quickshift finds one segment on the 8x8 grid; the default falls back to SLIC."""
    saliency = DFLime(n_samples=24, batch_size=12).explain(tiny_model, tiny_run, STEP).saliency
    assert saliency.shape == (8, 8) and np.ptp(saliency) > 0


def test_the_papers_quickshift_is_refused_where_it_finds_one_segment(tiny_model, tiny_run):
    with pytest.raises(ValueError, match=r"segmentation='quickshift' must give at least 2 segments, got 1 .*8x8.*"
                                         r"kernel_size=4.*segmentation='auto' or 'slic'"):
        DFLime(n_samples=24, segmentation="quickshift").explain(tiny_model, tiny_run, STEP)
    with pytest.raises(ValueError, match=r"segmentation='slic' must give at least 2 segments, got 1 .*n_segments=1"):
        superpixels(tiny_model, tiny_run.records[STEP - 1].next_latents, "slic", n_segments=1)


def test_auto_keeps_the_papers_quickshift_where_it_gives_segments(tiny_model, tiny_run):
    inputs_latents = tiny_run.records[STEP - 1].next_latents
    quick, used = superpixels(tiny_model, inputs_latents, "quickshift", **SMALL_QUICKSHIFT)
    auto, used_auto = superpixels(tiny_model, inputs_latents, "auto", **SMALL_QUICKSHIFT)
    assert used == used_auto == "quickshift" and quick.max() >= 1 and np.array_equal(quick, auto)
    assert sorted(np.unique(quick)) == list(range(quick.max() + 1))  # labels 0..S-1
    _, fallback = superpixels(tiny_model, inputs_latents, "auto")  # the paper's parameters: one segment
    assert fallback == "slic"
    options = dict(n_samples=12, batch_size=12, **SMALL_QUICKSHIFT)
    np.testing.assert_array_equal(DFLime(**options).explain(tiny_model, tiny_run, STEP).saliency,
                                  DFLime(segmentation="quickshift", **options).explain(tiny_model, tiny_run, STEP).saliency)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"segmentation": "felzenszwalb"}, "segmentation must be one of"),
        ({"n_segments": 1}, r"n_segments must be an integer in \[2, "),
        ({"compactness": 0}, r"compactness must be a finite number in \(0.0, "),
        ({"output": "mean"}, "output must be one of"),
    ],
)
def test_segmentation_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        DFLime(**options)


def test_outputs_of_the_step_error_and_of_the_paper(tiny_model, tiny_run):
    """Step error: one number per perturbation, from the real x_t; the paper's: the channel mean of the
    x_{t-1} stepped from the perturbed latent, at every latent pixel."""
    inputs = step_inputs(tiny_model, tiny_run, STEP)
    segments, _ = superpixels(tiny_model, inputs.next_latents, **SMALL_QUICKSHIFT)
    vectors = DFLime(n_samples=6).perturbations(int(segments.max()) + 1)
    vectors[1] = 0  # all off
    error = DFLime(n_samples=6).outputs(tiny_model, inputs, segments, vectors)
    paper = DFLime(n_samples=6, output="paper").outputs(tiny_model, inputs, segments, vectors)
    assert error.shape == (6, 1) and paper.shape == (6, 64) and (error <= 0).all()
    with torch.no_grad():
        for row, latents in ((0, inputs.latents), (1, torch.zeros_like(inputs.latents))):
            prediction = guided_prediction(tiny_model, inputs, latents)
            step = step_from(tiny_model, inputs, inputs.latents, prediction).float()  # from the real x_t
            expected = -(step - inputs.next_latents.float()).pow(2).mean().item()
            assert error[row, 0] == pytest.approx(expected, rel=1e-3, abs=1e-7)
            np.testing.assert_allclose(paper[row], step_from(tiny_model, inputs, latents, prediction).float().mean(1).flatten(),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_on_the_embedded_model_the_map_is_not_flat_and_favours_the_shape(embedded_model, circle_run):
    """Issue 20: the paper's quickshift found one segment on the 16x16 grid and the map was all zeros."""
    mask = shape_grid(circle_run)
    assert 0 < mask.sum() < mask.size
    segments, used = superpixels(embedded_model, circle_run.records[15].next_latents)
    assert used == "slic" and segments.max() + 1 >= 8
    for step in (16, 20):
        saliency = DFLime(n_samples=200, batch_size=100).explain(embedded_model, circle_run, step).saliency
        assert np.ptp(saliency) > 0, step
        assert inside_outside_ratio(saliency, mask) > 1.5, (step, inside_outside_ratio(saliency, mask))
    shuffled = DFLime(n_samples=200, batch_size=100).explain(embedded_model.randomised(), circle_run, 20).saliency
    assert spearman(saliency, shuffled) < 0.5, spearman(saliency, shuffled)  # the model randomisation check

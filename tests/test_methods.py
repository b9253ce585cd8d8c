"""The explanation methods: one contract for all, fast equals slow reference, meaning on the embedded model."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate

from explainer import config
from explainer.capture import capture_attention
from explainer.methods import METHODS, CentreBaseline, DFCam, DFLime, DFRise, RandomBaseline, TokenRelevance, cam_layers
from explainer.methods.cam import LAYER_SCALES, layer_map
from explainer.methods import relevance as relevance_module
from explainer.methods.relevance import RelevanceState, attention_scores, cheap_token_scores, relevance_hooks, relevance_series
from explainer.methods.rise import default_similarity
from explainer.models import OutOfDeviceMemory
from explainer.metrics import insertion_deletion, inside_outside_ratio, spearman
from explainer.render import pictures
from explainer.replay import guided_prediction, step_from, step_inputs
from explainer.run import InstrumentedRun, RunSettings

PROMPT = "a cat on a red circle"
STEP = 3

CASES = [
    ("relevance", {}),
    ("relevance", {"word": "circle"}),
    ("relevance", {"word": "circle", "rectify": "relu"}),
    ("df-rise", {"n_masks": 8, "batch_size": 3}),
    ("df-rise", {"n_masks": 8, "batch_size": 3, "mode": "paper", "mask": "grid", "grid": 3}),
    ("df-cam", {}),
    ("df-cam", {"rectify": "abs"}),
    ("df-cam", {"target": "sum"}),
    ("df-cam", {"weighting": "hirescam"}),
    ("df-cam", {"weighting": "grad-cam", "layer_scale": "min-max"}),
    ("df-lime", {"n_samples": 24, "batch_size": 10, "kernel_size": 1, "max_dist": 5}),
    ("random", {"seed": 4}),
    ("centre", {"sigma": 0.3}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


@pytest.fixture(scope="module")
def tiny_run(tiny_model):
    settings = RunSettings(prompt=PROMPT, steps=4, guidance=5.0, width=64, height=64, seed=3)
    return InstrumentedRun(tiny_model, settings).run_all().data


def hook_count(model) -> int:
    modules = [m for part in (model.pipe.unet, model.pipe.text_encoder, model.pipe.vae) for m in part.modules()]
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, name, {})) for m in modules for name in names)


@pytest.fixture(scope="module")
def half_model():
    """The tiny model in float16, as the app loads every model on a GPU (CPU float16 here)."""
    from explainer.models import LoadedModel
    from explainer.families.sd1_tiny import tiny_pipeline

    return LoadedModel.from_pipeline(tiny_pipeline().to(dtype=torch.float16), model_id="tiny-random")


def test_a_half_precision_model_runs_and_gives_the_float32_maps(tiny_model, tiny_run, half_model):
    """Dtype slips (a float32 tensor meeting float16 weights, gradients underflowing) would
    otherwise surface only on the Space's GPU."""
    half_run = InstrumentedRun(half_model, tiny_run.settings).run_all().data
    assert np.abs(half_run.final_array - tiny_run.final_array).max() < 0.02
    assert all(np.isfinite(r.attention.astype(np.float32)).all() for r in half_run.records)
    for name, options in CASES:
        full = METHODS[name](**options).explain(tiny_model, tiny_run, STEP).saliency
        half = METHODS[name](**options).explain(half_model, tiny_run, STEP).saliency
        assert half.shape == full.shape and np.isfinite(half).all(), name
        if np.ptp(full) > 0 and name != "df-lime":  # DF-LIME's ridge weights on few samples are brittle
            assert spearman(full, half) > 0.95, f"{name} {options}: Spearman {spearman(full, half):.3f}"
    scores = insertion_deletion(half_model, tiny_run, STEP, full)
    assert np.isfinite([scores["insertion_auc"], scores["deletion_auc"]]).all()
    series = relevance_series(half_model, tiny_run)["scores"]  # the Concepts tab's relevance chart
    assert all(np.isfinite(values).all() for values in series.values())


def test_a_run_for_computing_is_smaller_and_gives_the_same_maps(tiny_model):
    """What the app hands to its GPU calls (ZeroGPU pickles it into the worker)."""
    import pickle

    settings = RunSettings(prompt=PROMPT, steps=4, guidance=5.0, width=64, height=64, seed=3, per_group=True)
    run = InstrumentedRun(tiny_model, settings).run_all().data
    slim = run.for_computing()
    assert len(pickle.dumps(slim)) < 0.5 * len(pickle.dumps(run))
    assert run.records[0].group_attention and run.records[-1].prediction_view is not None and run.done  # untouched
    for name, options in CASES:
        expected = METHODS[name](**options).explain(tiny_model, run, STEP).saliency
        assert np.array_equal(METHODS[name](**options).explain(tiny_model, slim, STEP).saliency, expected), name
    assert insertion_deletion(tiny_model, slim, STEP, expected) == insertion_deletion(tiny_model, run, STEP, expected)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_contract_shape_range_and_same_seed_same_map(tiny_model, tiny_run, name, options):
    first = METHODS[name](**options).explain(tiny_model, tiny_run, STEP)
    again = METHODS[name](**options).explain(tiny_model, tiny_run, STEP)
    assert first.method == name and first.step == STEP and first.timestep == tiny_run.records[STEP - 1].timestep
    assert first.saliency.shape == (8, 8) and first.saliency.dtype == np.float32
    assert np.isfinite(first.saliency).all() and first.saliency.min() >= 0 and first.saliency.max() <= 1
    assert np.array_equal(first.saliency, again.saliency)
    expected = {**METHODS[name]().options, **options}
    if name == "df-rise" and "similarity" not in options:  # the one default that follows other options
        expected["similarity"] = default_similarity(expected["mode"], expected["estimator"])
    assert first.options == expected
    assert first.upsampled((64, 48)).shape == (48, 64)
    picture = tiny_run.records[STEP - 1].preview_prediction
    assert pictures.overlay(picture, first.saliency).size == picture.size


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_no_hook_or_processor_left_after_a_run_or_an_error(tiny_model, tiny_run, monkeypatch, name, options):
    unet = tiny_model.pipe.unet
    processors, hooks = unet.attn_processors, hook_count(tiny_model)
    METHODS[name](**options).explain(tiny_model, tiny_run, STEP)
    assert unet.attn_processors == processors and hook_count(tiny_model) == hooks

    def fail(*args, **kwargs):
        raise RuntimeError("failure inside the denoiser")

    monkeypatch.setattr(unet.mid_block, "forward", fail)
    if name not in ("random", "centre"):  # the baselines never call the model
        with pytest.raises(RuntimeError, match="failure inside"):
            METHODS[name](**options).explain(tiny_model, tiny_run, STEP)
    monkeypatch.undo()
    assert unet.attn_processors == processors and hook_count(tiny_model) == hooks


@pytest.mark.parametrize("name, options", [("df-rise", {"n_masks": 8, "batch_size": 3}), ("relevance", {})], ids=["df-rise", "relevance"])
def test_running_out_of_gpu_memory_is_a_clear_refusal_and_the_model_still_works(tiny_model, tiny_run, monkeypatch, name,
                                                                                options):
    unet = tiny_model.pipe.unet
    processors, hooks = unet.attn_processors, hook_count(tiny_model)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(unet.mid_block, "forward", out_of_memory)
    with pytest.raises(OutOfDeviceMemory, match=rf"of step {STEP} of a 64×64 run on .* ran out of GPU memory\. .*smaller picture"):
        METHODS[name](**options).explain(tiny_model, tiny_run, STEP)
    monkeypatch.undo()
    assert unet.attn_processors == processors and hook_count(tiny_model) == hooks
    assert METHODS[name](**options).explain(tiny_model, tiny_run, STEP).saliency.shape == (8, 8)


def test_token_relevance_stops_before_its_attention_maps_outgrow_the_budget(tiny_model, tiny_run, monkeypatch):
    """On a GPU the budget is a share of the free memory; here it is set below what the tiny model keeps."""
    kept = {}
    original = RelevanceState.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kept["state"] = self

    monkeypatch.setattr(RelevanceState, "__init__", remember)
    TokenRelevance().explain(tiny_model, tiny_run, STEP)
    needed = kept["state"].kept_bytes  # every attention's probabilities, text encoder's and denoiser's
    assert needed > 0 and kept["state"].budget is None  # no budget on a CPU
    hooks = hook_count(tiny_model)
    monkeypatch.setattr(relevance_module, "memory_budget", lambda device, share: needed // 2)
    with pytest.raises(OutOfDeviceMemory, match=r"keeps every attention map of the step .* more than 0\.0 GiB, 50% of the GPU"):
        TokenRelevance().explain(tiny_model, tiny_run, STEP)
    assert hook_count(tiny_model) == hooks
    monkeypatch.setattr(relevance_module, "memory_budget", lambda device, share: needed)
    assert TokenRelevance().explain(tiny_model, tiny_run, STEP).token_maps  # exactly enough is enough


def test_a_run_that_runs_out_of_gpu_memory_is_a_clear_refusal(tiny_model, monkeypatch):
    settings = RunSettings(prompt="a dog", steps=3, guidance=5.0, width=64, height=64, seed=1)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(tiny_model.pipe.unet.mid_block, "forward", out_of_memory)
    with pytest.raises(OutOfDeviceMemory, match=r"Step 1 of a 64×64 run on .* ran out of GPU memory\. Generate a smaller"):
        InstrumentedRun(tiny_model, settings).run_all()
    monkeypatch.undo()
    assert len(InstrumentedRun(tiny_model, settings).run_all().data.records) == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DFRise(n_masks=0), "n_masks must be an integer in"),
        (lambda: DFRise(keep=0.0), r"keep must be a finite number in \(0.0, 1.0\]"),
        (lambda: DFRise(keep=float("nan")), "keep must be a finite number"),
        (lambda: DFRise(mask="blob"), "mask must be one of"),
        (lambda: DFRise(mode="fast"), "mode must be one of"),
        (lambda: DFRise(estimator="max"), "estimator must be one of"),
        (lambda: DFRise(batch_size=0), "batch_size must be an integer"),
        (lambda: DFRise(seed=-1), "seed must be an integer"),
        (lambda: DFLime(n_samples=1), "n_samples must be an integer"),
        (lambda: DFLime(kernel_width=0), "kernel_width must be a finite number"),
        (lambda: DFCam(layers="down_blocks.0.resnets.0"), "layers must be a list"),
        (lambda: DFCam(rectify="square"), r"rectify must be one of \('abs', 'relu'\)"),
        (lambda: DFCam(target="energy"), r"target must be one of \('guidance', 'sum'\)"),
        (lambda: DFCam(weighting="score-cam"), r"weighting must be one of \('layercam', 'hirescam', 'grad-cam'\)"),
        (lambda: DFCam(layer_scale="max"), r"layer_scale must be one of \('target', 'min-max'\)"),
        (lambda: TokenRelevance(rectify=None), "rectify must be one of"),
        (lambda: TokenRelevance(word=" "), "word must be a word of the prompt"),
        (lambda: CentreBaseline(sigma=-1.0), "sigma must be a finite number"),
        (lambda: RandomBaseline(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_options_get_clear_messages(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "method, step, message",
    [
        (DFRise(n_masks=2), 0, r"step must be an integer in \[1, 4\], got 0"),
        (DFCam(), 5, r"step must be an integer in \[1, 4\], got 5"),
        (TokenRelevance(word="dog"), 2, "The word 'dog' is not in the prompt"),
        (DFCam(layers=("up_blocks.9.resnets.0",)), 2, "unknown or empty"),
    ],
)
def test_bad_calls_get_clear_messages(tiny_model, tiny_run, method, step, message):
    with pytest.raises(ValueError, match=message):
        method.explain(tiny_model, tiny_run, step)


def test_step_inputs_rebuild_the_recorded_prediction_and_the_ddim_step(tiny_model):
    # a custom list with "ddim" runs DPM-Solver++ of order 1: exactly the DDIM update, without clipping x0
    schedule = [999, 800, 600, 350]
    settings = RunSettings(prompt=PROMPT, steps=4, guidance=5.0, width=64, height=64, seed=3, scheduler="ddim", schedule=schedule)
    run = InstrumentedRun(tiny_model, settings).run_all().data
    for step, record in enumerate(run.records, start=1):
        inputs = step_inputs(tiny_model, run, step)
        with torch.no_grad():
            prediction = guided_prediction(tiny_model, inputs, inputs.latents)
        torch.testing.assert_close(prediction, record.noise_pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_from(tiny_model, inputs, inputs.latents, prediction), record.next_latents, atol=1e-4, rtol=1e-4)


# --- DF-RISE: batched equals one mask at a time, structure term straight from the formula ---------


def gaussian_15x15() -> np.ndarray:
    offsets = np.arange(15) - 7.0
    line = np.exp(-(offsets**2) / (2 * 1.5**2))
    return np.outer(line, line) / np.outer(line, line).sum()


def numpy_squared_error(real: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Minus the local mean squared difference (C, h, w) x 2 -> (h, w), same window, channel mean."""
    diff = (real.astype(np.float64) - other.astype(np.float64)) ** 2
    return -np.mean([correlate(d, gaussian_15x15(), mode="constant", cval=0.0) for d in diff], axis=0)


def numpy_structure(real: np.ndarray, other: np.ndarray) -> np.ndarray:
    """SSIM structure term (C, h, w) x 2 -> (h, w): Gaussian 15x15 window, sigma 1.5, zero padding, C3 = 0.03^2 / 2."""
    window = gaussian_15x15()
    c3 = 0.03**2 / 2
    maps = []
    for x, y in zip(real.astype(np.float64), other.astype(np.float64)):

        def mean(v):
            return correlate(v, window, mode="constant", cval=0.0)

        var_x = np.maximum(mean(x * x) - mean(x) ** 2, 0)
        var_y = np.maximum(mean(y * y) - mean(y) ** 2, 0)
        covariance = mean(x * y) - mean(x) * mean(y)
        maps.append((covariance + c3) / (np.sqrt(var_x) * np.sqrt(var_y) + c3))
    return np.mean(maps, axis=0)


def slow_rise(model, run, step, method: DFRise) -> np.ndarray:
    pipe, record = model.pipe, run.records[step - 1]
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, None)
        embeddings = torch.cat([negative, positive])
    alphas = pipe.scheduler.alphas_cumprod
    a_t, a_next = float(alphas[record.timestep]), float(alphas[record.next_timestep])
    x_t, real_next = record.latents.clone(), record.next_latents.clone().numpy()[0]
    kept, dropped = [], []  # per mask: score where kept, score where dropped
    for mask in method.masks((8, 8)):  # one mask at a time
        masked = mask * x_t
        with torch.no_grad():
            out = pipe.unet(torch.cat([masked, masked]), record.timestep, encoder_hidden_states=embeddings).sample
        unconditional, conditional = out.chunk(2)
        eps = unconditional + 5.0 * (conditional - unconditional)
        if method.mode == "paper":
            compared = eps
        else:  # DDIM from t_k to t_{k+1}, from the real x_t
            x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            compared = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps
        similarity = numpy_structure if method.similarity == "structure" else numpy_squared_error
        score, weight = similarity(real_next, compared.numpy()[0]), mask[0].numpy()
        kept.append(weight * score), dropped.append((1 - weight) * score)
    weights = method.masks((8, 8))[:, 0].numpy()
    total = np.sum(kept, axis=0)
    if method.estimator in ("mean", "contrast"):
        total = total / np.maximum(weights.sum(0), 1e-6)
    if method.estimator == "contrast":
        total = total - np.sum(dropped, axis=0) / np.maximum((1 - weights).sum(0), 1e-6)
    total = np.maximum(total, 0)
    return ((total - total.min()) / (total.max() - total.min())).astype(np.float32)


@pytest.mark.parametrize(
    "mode, mask, estimator, similarity",
    [("next-latent", "pixel", "sum", "structure"), ("paper", "pixel", "sum", None), ("paper", "grid", "mean", None),
     ("next-latent", "pixel", "contrast", "structure"), ("next-latent", "pixel", "contrast", None), ("next-latent", "grid", "contrast", None)],
)
def test_batched_rise_equals_one_mask_at_a_time(tiny_model, tiny_run, mode, mask, estimator, similarity):
    method = DFRise(n_masks=8, batch_size=3, mode=mode, mask=mask, grid=3, seed=5, estimator=estimator, similarity=similarity)
    fast = method.explain(tiny_model, tiny_run, STEP)
    assert fast.denoiser_calls == 3
    np.testing.assert_allclose(fast.saliency, slow_rise(tiny_model, tiny_run, STEP, method), atol=1e-4)


def test_rise_similarity_defaults_to_squared_error_where_it_applies_and_refuses_it_elsewhere():
    assert (DFRise().similarity, DFRise(mode="paper").similarity, DFRise(estimator="sum").similarity) == (
        "squared-error", "structure", "structure")
    assert DFRise(similarity="structure").options["similarity"] == "structure"
    for options in ({"mode": "paper"}, {"estimator": "mean"}):
        with pytest.raises(ValueError, match="similarity='squared-error' needs mode='next-latent' and estimator='contrast'"):
            DFRise(similarity="squared-error", **options)
    with pytest.raises(ValueError, match=r"similarity must be one of \('squared-error', 'structure'\), got 'ssim'"):
        DFRise(similarity="ssim")


def test_rise_masks_are_seeded_and_keep_about_p():
    masks = DFRise(n_masks=400, keep=0.3, seed=1).masks((16, 16))
    assert masks.shape == (400, 1, 16, 16) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert abs(masks.mean().item() - 0.3) < 0.01
    assert torch.equal(masks, DFRise(n_masks=400, keep=0.3, seed=1).masks((16, 16)))
    assert not torch.equal(masks, DFRise(n_masks=400, keep=0.3, seed=2).masks((16, 16)))
    grid = DFRise(n_masks=50, mask="grid", grid=4).masks((16, 16))
    assert grid.shape == (50, 1, 16, 16) and 0 <= grid.min() and grid.max() <= 1


# --- DF-CAM: one pass equals one pass per layer --------------------------------------------------


RECTIFY = {"abs": torch.abs, "relu": torch.relu}


def slow_cam(model, run, step, rectify="abs", target="sum", weighting="grad-cam", layer_scale="min-max"):
    """One forward and backward per layer, hooking only that layer; Grad-CAM straight from docs/methods.md, DF-CAM
    (``rectify="relu"``, ``target="sum"``, ``layer_scale="min-max"``), or with the magnitude of each
    layer's weighted sum (``"abs"``), or for the target ||eps_c - eps_u||^2 (``"guidance"``; its 1/2 in
    the library scales every gradient alike, which the final min-max removes), or with the gradient at
    each pixel (``"hirescam"``) or its positive part (``"layercam"``) as the weight, or with the layers'
    maps summed as they are, each latent pixel taking its share of a coarse layer's pixel
    (``layer_scale="target"``)."""
    unet = model.pipe.unet
    inputs = step_inputs(model, run, step)
    weight = run.settings.guidance
    embeddings = model.encode(run.settings.prompt, run.settings.negative_prompt, guided=True).tensors["encoder_hidden_states"]
    if weight <= 1 and target == "sum":  # unguided: the conditional half alone, as the run made it
        embeddings = embeddings[1:]
    maps, raw = {}, {}
    for name in cam_layers(model):
        seen = {}

        def keep(module, args, output):
            feature = output[0] if isinstance(output, tuple) else output
            seen["A"] = feature.detach()
            feature.register_hook(lambda grad: seen.__setitem__("G", grad))

        handle = unet.get_submodule(name).register_forward_hook(keep)
        try:
            latents = inputs.latents.clone().requires_grad_(True)
            with torch.enable_grad():
                out = unet(torch.cat([latents] * len(embeddings)), inputs.timestep, encoder_hidden_states=embeddings).sample
                explained = out.sum() if target == "sum" else ((out[1] - out[0]) ** 2).sum()
                torch.autograd.grad(explained, latents)
        finally:
            handle.remove()
        if weight > 1:
            a = seen["A"][0] + weight * (seen["A"][1] - seen["A"][0])
            g = seen["G"][0] + weight * (seen["G"][1] - seen["G"][0])
        else:  # the conditional half: the run's own prediction
            a, g = seen["A"][-1], seen["G"][-1]
        weights = {"grad-cam": g.mean(dim=(1, 2))[:, None, None], "hirescam": g, "layercam": torch.relu(g)}[weighting]
        cam = RECTIFY[rectify]((weights * a).sum(0))
        pixels_per_cell = 64 / cam.numel()  # the tiny model's latent grid is 8x8
        cam = F.interpolate(cam[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0].numpy()
        raw[name] = cam / pixels_per_cell
        maps[name] = (cam - cam.min()) / (cam.max() - cam.min()) if cam.max() > cam.min() else np.zeros_like(cam)
    total = sum((raw if layer_scale == "target" else maps).values())
    return maps, (total - total.min()) / (total.max() - total.min())


def count_calls(unet):
    calls = []
    return calls, unet.register_forward_pre_hook(lambda module, args: calls.append(1))


@pytest.mark.parametrize(
    "rectify, target, weighting, layer_scale",
    [("abs", "sum", "grad-cam", "min-max"), ("relu", "sum", "grad-cam", "min-max"), ("abs", "guidance", "grad-cam", "min-max"),
     ("relu", "guidance", "grad-cam", "target"), ("relu", "guidance", "hirescam", "min-max"), ("abs", "sum", "hirescam", "target"),
     ("relu", "guidance", "layercam", "target"), ("relu", "sum", "layercam", "min-max")],
)
def test_one_pass_cam_equals_one_pass_per_layer(tiny_model, tiny_run, rectify, target, weighting, layer_scale):
    unet = tiny_model.pipe.unet
    calls, handle = count_calls(unet)
    options = dict(rectify=rectify, target=target, weighting=weighting, layer_scale=layer_scale)
    try:
        fast = DFCam(**options).explain(tiny_model, tiny_run, STEP)
        fast_calls = len(calls)
        per_layer, total = slow_cam(tiny_model, tiny_run, STEP, **options)
    finally:
        handle.remove()
    names = cam_layers(tiny_model)
    assert len(names) == 17 and any(".attentions." in n for n in names) and any(".upsamplers." in n for n in names)
    assert fast_calls == fast.denoiser_calls == 1 and len(calls) - fast_calls == len(names)
    assert set(fast.per_layer) == set(per_layer)
    for name in names:
        np.testing.assert_allclose(fast.per_layer[name], per_layer[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(fast.saliency, total, atol=1e-5)


# --- DF-LIME: batched equals one at a time ----------------------------------------------------------


def test_batched_lime_equals_one_at_a_time(tiny_model, tiny_run):
    options = {"n_samples": 12, "kernel_size": 1, "max_dist": 5}
    fast = DFLime(batch_size=5, **options).explain(tiny_model, tiny_run, STEP)
    slow = DFLime(batch_size=1, **options).explain(tiny_model, tiny_run, STEP)
    assert (fast.denoiser_calls, slow.denoiser_calls) == (3, 12)
    assert fast.saliency.max() == 1.0  # several segments on the 8x8 grid with a small kernel
    np.testing.assert_allclose(fast.saliency, slow.saliency, atol=1e-4)


# --- cheap scores and chart data ---------------------------------------------------------------------


def test_cheap_scores_and_relevance_series(tiny_model, tiny_run):
    assert cheap_token_scores(tiny_run, 2) == attention_scores(tiny_run, tiny_run.records[1])
    for score in ("peak", "mass"):
        values = list(attention_scores(tiny_run, tiny_run.records[1], score).values())
        assert max(values) == 1.0 and min(values) >= 0.0
    with pytest.raises(ValueError, match="score must be one of"):
        attention_scores(tiny_run, tiny_run.records[1], "sum")
    series = relevance_series(tiny_model, tiny_run, steps=[1, 4])
    assert series["steps"] == [1, 4]
    assert list(series["scores"]) == [f"{i}:{w}" for i, w in enumerate(tiny_run.tokens.word_texts)]
    assert all(len(values) == 2 and max(values) <= 1 for values in series["scores"].values())


def test_the_peak_score_ranks_the_drawn_shape_first_where_the_papers_mass_ranks_the_last_word(embedded_model):
    """The paper's mass favours words spread over the whole picture (a causal encoder's last word
    carries the prompt); the peak follows where a word is drawn (docs/methods.md, Quick scores)."""
    run = InstrumentedRun(embedded_model, RunSettings(prompt="a red circle on the left", steps=10, guidance=5.0,
                                                      width=64, height=64, seed=1)).run_all().data
    for record in run.records[2:]:
        peak, mass = attention_scores(run, record, "peak"), attention_scores(run, record, "mass")
        assert max(peak, key=peak.get) == "2:circle" and max(mass, key=mass.get) == "5:left"
        assert peak["1:red"] > peak["0:a"] and mass["1:red"] < mass["0:a"]


def test_a_spot_on_the_drawn_circle_looks_at_the_circle_and_a_background_spot_does_not(embedded_model):
    from explainer.methods import SpotAttention

    run = InstrumentedRun(embedded_model, RunSettings(prompt="a red circle on the left", steps=10, guidance=5.0,
                                                      width=64, height=64, seed=1)).run_all().data
    circle = run.records[-1].attention[list(run.tokens.words[2].positions)].astype(np.float32).sum(0)
    on_shape = np.unravel_index(circle.argmax(), circle.shape)
    on_background = np.unravel_index(circle.argmin(), circle.shape)
    inside = SpotAttention(row=int(on_shape[0]), column=int(on_shape[1])).explain(embedded_model, run, 8)
    outside = SpotAttention(row=int(on_background[0]), column=int(on_background[1])).explain(embedded_model, run, 8)
    assert max(inside.token_scores, key=inside.token_scores.get) == "2:circle"
    assert inside.token_scores["2:circle"] > 5 * outside.token_scores["2:circle"]
    assert inside.saliency.shape == run.latent_size and inside.denoiser_calls == 1
    assert inside.saliency[circle > np.percentile(circle, 90)].mean() > inside.saliency.mean()  # it looks at its shape
    with pytest.raises(ValueError, match="row must be an integer in"):
        SpotAttention(row=16).explain(embedded_model, run, 8)


def test_methods_work_without_guidance(tiny_model):
    settings = RunSettings(prompt=PROMPT, steps=3, guidance=1.0, width=64, height=64, seed=2)
    run = InstrumentedRun(tiny_model, settings).run_all().data
    for method in (DFRise(n_masks=4), DFCam(), TokenRelevance(word="cat")):
        explanation = method.explain(tiny_model, run, 2)
        assert explanation.saliency.shape == (8, 8) and explanation.saliency.max() == 1.0


def test_relevance_inside_capture_attention_restores_the_capture_processors(tiny_model, tiny_run):
    unet = tiny_model.pipe.unet
    with capture_attention(tiny_model):
        installed = unet.attn_processors
        inside = TokenRelevance().explain(tiny_model, tiny_run, STEP)
        assert unet.attn_processors == installed
    outside = TokenRelevance().explain(tiny_model, tiny_run, STEP)
    assert inside.token_scores == outside.token_scores


# --- token relevance: equals a direct double loop over layers and rows (docs/methods.md, Token relevance) ---


class ProbabilityProcessor:
    """Plain attention for the tiny UNet's transformer blocks, keeping every probability tensor."""

    def __init__(self, kept):
        self.kept = kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert not attn.residual_connection and attn.rescale_output_factor == 1 and attn.norm_cross is None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, tokens, _ = query.shape
        query, key, value = (x.view(batch, x.shape[1], attn.heads, -1).transpose(1, 2) for x in (query, key, value))
        probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1)  # (batch, heads, N, K)
        self.kept.append((encoder_hidden_states is not None, probs))
        out = (probs @ value).transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of bilinear upsampling with half-pixel centres and clamped edges."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        x = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = int(np.floor(x))
        high, frac = min(low + 1, size_in - 1), x - low
        matrix[i, low] += 1 - frac
        matrix[i, high] += frac
    return matrix


def norm_rule(r: np.ndarray) -> np.ndarray:
    eye = np.eye(len(r))
    rest = r - eye
    for row in range(len(rest)):
        total = rest[row].sum()
        rest[row] = rest[row] / total if total != 0 else 0
    return rest + eye


def abar(probs: torch.Tensor, gradient: torch.Tensor, rectify: str) -> np.ndarray:
    product = gradient.double().numpy() * probs.detach().double().numpy()
    return (np.abs(product) if rectify == "abs" else np.maximum(product, 0)).mean(0)


def slow_relevance(model, run, step, rectify="abs"):
    pipe = model.pipe
    unet, text_encoder = pipe.unet, pipe.text_encoder
    inputs = step_inputs(model, run, step)
    kept, originals = [], unet.attn_processors
    implementation = text_encoder.config._attn_implementation
    try:
        unet.set_attn_processor(ProbabilityProcessor(kept))
        text_encoder.set_attn_implementation("eager")
        with torch.enable_grad():
            encoded = text_encoder(torch.tensor([run.tokens.ids]), output_attentions=True)
            text_probs = list(encoded.attentions)  # each (1, heads, L, L)
            latents = inputs.latents.clone().requires_grad_(True)
            text = torch.cat([inputs.conditioning.tensors["encoder_hidden_states"][:1], encoded[0]])
            out = unet(torch.cat([latents, latents]), inputs.timestep, encoder_hidden_states=text).sample
            gradients = torch.autograd.grad(out.sum(), [p for _, p in kept] + text_probs)
    finally:
        unet.set_attn_processor(originals)
        text_encoder.set_attn_implementation(implementation)
    unet_gradients, text_gradients = gradients[: len(kept)], gradients[len(kept) :]
    length = text_probs[0].shape[-1]
    r_qq = np.eye(length)
    for probs, gradient in zip(text_probs, text_gradients):
        r_qq = r_qq + abar(probs[0], gradient[0], rectify) @ r_qq
    n = 64  # 8 x 8 latent grid
    r_ii, r_iq = np.eye(n), np.zeros((n, length))
    for (cross, probs), gradient in zip(kept, unet_gradients):
        layer = abar(probs[1], gradient[1], rectify)  # conditional half, (N_l, N_l or L)
        side = int(round(np.sqrt(layer.shape[0])))
        upsample = np.kron(bilinear_matrix(side, 8), bilinear_matrix(side, 8))  # (N, N_l)
        if cross:
            r_iq = r_iq + norm_rule(r_ii).T @ (upsample @ layer) @ norm_rule(r_qq)
        else:
            layer = upsample @ layer @ upsample.T * layer.shape[0] / n
            r_iq = r_iq + layer @ r_iq
            r_ii = r_ii + layer @ r_ii
            for row in range(n):
                length_of_row = np.sqrt((r_iq[row] ** 2).sum())
                r_iq[row] = r_iq[row] / length_of_row if length_of_row > 0 else 0
    columns = [r_iq[:, list(w.positions)].sum(1) for w in run.tokens.words]
    sums = np.array([c.sum() for c in columns])
    return (sums - sums.min()) / (sums.max() - sums.min()), [c.reshape(8, 8) for c in columns]


@pytest.mark.parametrize("rectify", ["abs", "relu"])
def test_relevance_equals_a_direct_loop_over_layers(tiny_model, tiny_run, rectify):
    fast = TokenRelevance(word="circle", rectify=rectify).explain(tiny_model, tiny_run, STEP)
    scores, maps = slow_relevance(tiny_model, tiny_run, STEP, rectify)
    np.testing.assert_allclose(list(fast.token_scores.values()), scores, atol=1e-4)
    for fast_map, slow_map in zip(fast.token_maps.values(), maps):
        np.testing.assert_allclose(fast_map, (slow_map - slow_map.min()) / np.ptp(slow_map), atol=1e-4)
    circle = maps[tiny_run.tokens.find("circle")]
    np.testing.assert_allclose(fast.saliency, (circle - circle.min()) / np.ptp(circle), atol=1e-4)


def negate_output(unet, monkeypatch):
    """Make the UNet predict minus its noise: the methods' target, the output's sum, flips sign."""
    forward = unet.forward

    def negated(*args, **kwargs):
        output = forward(*args, **kwargs)
        return (-output[0], *output[1:]) if isinstance(output, tuple) else type(output)(sample=-output.sample)

    monkeypatch.setattr(unet, "forward", negated)


@pytest.mark.parametrize(
    "make", [lambda rectify: DFCam(target="sum", weighting="grad-cam", rectify=rectify), lambda rectify: TokenRelevance(rectify=rectify)]
)
def test_abs_maps_do_not_depend_on_the_sign_of_the_target_and_the_papers_relu_maps_do(tiny_model, tiny_run, make, monkeypatch):
    def maps(method):
        explanation = method.explain(tiny_model, tiny_run, STEP)
        return {"saliency": explanation.saliency, **(explanation.per_layer or {}), **(explanation.token_maps or {})}

    plain = {rectify: maps(make(rectify)) for rectify in ("abs", "relu")}
    negate_output(tiny_model.pipe.unet, monkeypatch)
    flipped = {rectify: maps(make(rectify)) for rectify in ("abs", "relu")}
    for name, expected in plain["abs"].items():
        np.testing.assert_allclose(flipped["abs"][name], expected, atol=1e-5, err_msg=name)
    changed = [name for name, expected in plain["relu"].items() if np.abs(flipped["relu"][name] - expected).max() > 0.1]
    assert "saliency" in changed and len(changed) >= len(plain["relu"]) // 2


def test_guidance_target_maps_do_not_depend_on_the_sign_of_the_output(tiny_model, tiny_run, monkeypatch):
    """||eps_c - eps_u||^2 has a sign of its own: with the UNet's output negated, DF-CAM's default
    maps (the paper's ReLU) stay as they were, where the sum target's maps change (test above)."""

    def maps():
        explanation = DFCam().explain(tiny_model, tiny_run, STEP)
        return {"saliency": explanation.saliency, **explanation.per_layer}

    assert DFCam().target == "guidance" and DFCam().rectify == "relu"
    plain = maps()
    negate_output(tiny_model.pipe.unet, monkeypatch)
    flipped = maps()
    for name, expected in plain.items():
        np.testing.assert_allclose(flipped[name], expected, atol=1e-5, err_msg=name)


def test_pixel_weightings_keep_where_the_gradient_is_and_equal_grad_cam_where_it_is_flat():
    generator = torch.Generator().manual_seed(0)
    activation = torch.randn(6, 4, 4, generator=generator)
    flat = torch.randn(6, 1, 1, generator=generator).expand(6, 4, 4)
    np.testing.assert_allclose(layer_map(activation, flat, (8, 8), "relu", "hirescam"),
                               layer_map(activation, flat, (8, 8), "relu", "grad-cam"), atol=1e-6)
    # one pixel's gradient alone: HiResCAM and LayerCAM put the whole map there, Grad-CAM spreads it
    # over the pixels whose activations agree with the mean
    spike = torch.zeros(6, 4, 4)
    spike[:, 1, 2] = activation[:, 1, 2].abs()
    for weighting in ("hirescam", "layercam"):
        cam = layer_map(activation.abs(), spike, (4, 4), "relu", weighting)
        assert cam[1, 2] > 0 and torch.count_nonzero(cam) == 1, weighting
    assert torch.count_nonzero(layer_map(activation.abs(), spike, (4, 4), "relu", "grad-cam")) > 1
    # LayerCAM drops what a negative gradient says; HiResCAM keeps it, with its sign
    assert torch.count_nonzero(layer_map(activation.abs(), -spike, (4, 4), "relu", "layercam")) == 0
    assert layer_map(activation.abs(), -spike, (4, 4), "abs", "hirescam")[1, 2] > 0


def test_a_coarse_layer_pixel_is_shared_among_the_latent_pixels_it_covers():
    """In the target's units a layer's map keeps its mass through the upsampling: a 2x2 layer with the
    same gradient x activation in every pixel gives each of the 8x8 latent pixels a sixteenth."""
    activation, gradient = torch.ones(3, 2, 2), torch.full((3, 2, 2), 2.0)
    cam = layer_map(activation, gradient, (8, 8), "relu", "hirescam")
    np.testing.assert_allclose(cam, np.full((8, 8), 6.0 / 16), rtol=1e-6)
    assert cam.sum() == pytest.approx(layer_map(activation, gradient, (2, 2), "relu", "hirescam").sum())


def test_layer_shares_say_how_much_of_the_summed_map_each_layer_carries(tiny_model, tiny_run):
    for layer_scale in LAYER_SCALES:
        explanation = DFCam(layer_scale=layer_scale).explain(tiny_model, tiny_run, STEP)
        shares = explanation.layer_shares
        assert set(shares) == set(explanation.per_layer) and sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        assert min(shares.values()) >= 0
    # in the target's units the layers differ in how much they carry, far more than min-maxed maps do
    spread = {}
    for layer_scale in LAYER_SCALES:
        shares = DFCam(layer_scale=layer_scale).explain(tiny_model, tiny_run, STEP).layer_shares.values()
        spread[layer_scale] = max(shares) / max(min(shares), 1e-9)
    assert spread["target"] > 10 * spread["min-max"]


def test_cam_on_an_unguided_run_explains_the_conditional_half(tiny_model):
    """At guidance 1 the run predicts with the prompt alone: the sum target explains that half, and
    the guidance target computes the empty prompt's half too, keeping A and G of the prompt's."""
    settings = RunSettings(prompt=PROMPT, steps=4, guidance=1.0, width=64, height=64, seed=3)
    run = InstrumentedRun(tiny_model, settings).run_all().data
    found = {}
    for target in ("guidance", "sum"):
        fast = DFCam(target=target, rectify="abs").explain(tiny_model, run, STEP)
        per_layer, total = slow_cam(tiny_model, run, STEP, "abs", target, "layercam", "target")
        for name, expected in per_layer.items():
            np.testing.assert_allclose(fast.per_layer[name], expected, atol=1e-5, err_msg=f"{target} {name}")
        np.testing.assert_allclose(fast.saliency, total, atol=1e-5)
        found[target] = fast.saliency
    assert np.abs(found["guidance"] - found["sum"]).max() > 0.1


def test_relevance_hooks_do_not_change_the_model(tiny_model, tiny_run):
    """Drift test: the explicit attention gives the stock outputs, and other threads' calls are left alone."""
    pipe, inputs = tiny_model.pipe, step_inputs(tiny_model, tiny_run, STEP)
    ids = torch.tensor([tiny_run.tokens.ids])
    with torch.no_grad():
        stock_text = pipe.text_encoder(ids)[0]
        stock = guided_prediction(tiny_model, inputs, inputs.latents)
    state, elsewhere = RelevanceState(conditional_index=1, batch_size=2, rectify="abs"), {}

    def other_thread():
        with torch.no_grad():
            elsewhere["prediction"] = guided_prediction(tiny_model, inputs, inputs.latents)

    with relevance_hooks(tiny_model, state), torch.enable_grad():
        ours_text = pipe.text_encoder(ids)[0]
        ours = guided_prediction(tiny_model, inputs, inputs.latents)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(state.text_layers) == 2 and len(state.denoiser_layers) == len(pipe.unet.attn_processors) == 14
    torch.testing.assert_close(ours_text, stock_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(elsewhere["prediction"], stock)


@pytest.mark.parametrize("make", [DFCam, TokenRelevance], ids=["df-cam", "relevance"])
def test_gradient_methods_and_a_run_in_two_threads_do_not_interfere(tiny_model, tiny_run, make):
    expected = make().explain(tiny_model, tiny_run, STEP).saliency
    settings = RunSettings(prompt="a dog", steps=6, guidance=5.0, width=64, height=64, seed=1)
    alone = InstrumentedRun(tiny_model, settings).run_all().data
    processors, found, runs = tiny_model.pipe.unet.attn_processors, [], []

    def explain_repeatedly():
        found.extend(make().explain(tiny_model, tiny_run, STEP).saliency for _ in range(6))

    def run_once():
        runs.append(InstrumentedRun(tiny_model, settings).run_all())

    threads = [threading.Thread(target=explain_repeatedly), threading.Thread(target=run_once)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 6 and all(np.allclose(saliency, expected, atol=1e-5) for saliency in found)
    assert [torch.equal(a.next_latents, b.next_latents) for a, b in zip(alone.records, runs[0].data.records)] == [True] * 6
    assert tiny_model.pipe.unet.attn_processors == processors


# --- meaning on the embedded shapes model (slow; skipped until the model is trained) -----------------

EMBEDDED = Path(config.MODELS[config.EMBEDDED_MODEL_ID].source)
needs_embedded = pytest.mark.skipif(
    not (EMBEDDED / "model_index.json").is_file(),
    reason=f"the embedded shapes model is not trained yet ({EMBEDDED}/model_index.json is missing)",
)
MEANING_PROMPTS = [("a red circle on the left", "circle"), ("a big blue square at the top", "square")]
MEANING_STEPS, LATE_STEPS = 20, range(16, 21)  # the last quarter of the steps
MEANING_METHODS = {"df-rise": lambda shape: DFRise(n_masks=500, batch_size=100), "df-cam": lambda shape: DFCam()}
MEANING_METHODS["relevance"] = lambda shape: TokenRelevance(word=shape)
MEANING_METHODS["df-lime"] = lambda shape: DFLime(n_samples=500, batch_size=100)  # half the default's samples, for time


def shape_on_latent_grid(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The generated shape's pixels (the shapes checker's segmentation), as a boolean latent-grid mask."""
    from explainer.shapes.checker import generated_shape_mask

    mask = generated_shape_mask(image).astype(np.float32)
    height, width = size
    blocks = mask.reshape(height, mask.shape[0] // height, width, mask.shape[1] // width)
    return blocks.mean(axis=(1, 3)) >= 0.5


@pytest.fixture(scope="module")
def meaning(embedded_model):
    """Maps of every method at the late steps, for the trained and the randomised model."""
    model = embedded_model
    random_model = model.randomised()
    results = []
    for prompt, shape in MEANING_PROMPTS:
        settings = RunSettings(prompt=prompt, steps=MEANING_STEPS, guidance=5.0, width=64, height=64, seed=1)
        run = InstrumentedRun(model, settings).run_all().data
        mask = shape_on_latent_grid((run.final_array * 255).round().astype(np.uint8), run.latent_size)
        for name, make in MEANING_METHODS.items():
            for step in LATE_STEPS:
                trained = make(shape).explain(model, run, step).saliency
                shuffled = make(shape).explain(random_model, run, step).saliency
                ratio = inside_outside_ratio(trained, mask)
                results.append((prompt, name, step, ratio, spearman(trained, shuffled), int(mask.sum())))
    for row in results:
        print("meaning: prompt=%r method=%s step=%d inside/outside=%.2f spearman_vs_random=%.2f shape_pixels=%d" % row)
    return results


# Measured on the embedded model in assets/ (after its ground phase, 2026-11-29), seed 1, 20 steps.
# A criterion a method misses would be listed here as an expected failure, thresholds unchanged, so the
# suite stays green while it is open; a fix shows up as XPASS. None is open: DF-CAM's defaults and
# DF-RISE's squared-error score closed the last two (2026-11-30). The same checks on 12 held-out
# prompts: scripts/meaning_checks.py (docs/results/meaning-checks.json), scripts/rise_similarity.py.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def meaning_cases(criterion: str) -> list:
    return [
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[criterion, name], strict=False))
        if (criterion, name) in KNOWN_FAILURES
        else name
        for name in MEANING_METHODS
    ]


@pytest.mark.slow
@needs_embedded
@pytest.mark.parametrize("method", meaning_cases("ratio"))
def test_maps_put_more_mass_on_the_shape_at_late_steps(meaning, method):
    failures = [(p, s, round(r, 2)) for p, name, s, r, _, _ in meaning if name == method and not r > 1.5]
    assert not failures, f"{method}: inside/outside <= 1.5 at (prompt, step, ratio) {failures}"


@pytest.mark.slow
@needs_embedded
@pytest.mark.parametrize("method", meaning_cases("randomisation"))
def test_model_randomisation_changes_the_maps(meaning, method):
    failures = [(p, s, round(c, 2)) for p, name, s, _, c, _ in meaning if name == method and not c < 0.5]
    assert not failures, f"{method}: Spearman with the randomised model's map >= 0.5 at {failures}"

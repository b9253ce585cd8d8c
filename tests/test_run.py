import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from explainer.families import FAMILIES
from explainer.run import InstrumentedRun, RunSettings
from explainer.schedules import timesteps as schedule_timesteps

PROMPT = "a cat on a red circle"


def settings(**changes):
    base = dict(prompt=PROMPT, steps=6, guidance=5.0, width=64, height=64, seed=3)
    base.update(changes)
    return RunSettings(**base)


def assert_same_records(first, second):
    first, second = first.data, second.data  # what each InstrumentedRun produced
    assert len(first.records) == len(second.records)
    for a, b in zip(first.records, second.records):
        assert a.timestep == b.timestep
        for name in ("latents", "next_latents", "x0_hat", "noise_pred"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(a.attention, b.attention)
        assert np.array_equal(np.asarray(a.prediction_view), np.asarray(b.prediction_view))
    assert np.array_equal(first.final_array, second.final_array)


def test_same_inputs_give_identical_records(tiny_model):
    assert_same_records(InstrumentedRun(tiny_model, settings()).run_all(), InstrumentedRun(tiny_model, settings()).run_all())


@pytest.mark.parametrize(
    "scheduler_name, schedule",
    [("dpm++", "uniform"), ("ddim", "uniform"), ("dpm++", "early"), ("dpm++", [999, 800, 600, 350, 120, 20])],
)
def test_final_image_equals_the_plain_pipeline(tiny_model, scheduler_name, schedule):
    """Capture must not change the generation."""
    run = InstrumentedRun(tiny_model, settings(scheduler=scheduler_name, schedule=schedule, concentration=10)).run_all()
    pipe = tiny_model.pipe
    original = pipe.scheduler
    pipe.scheduler = type(run.scheduler).from_config(run.scheduler.config)
    custom = schedule_timesteps(schedule, 6, concentration=10)
    try:
        kwargs = {"num_inference_steps": 6} if custom is None else {"timesteps": custom}
        expected = pipe(
            PROMPT, guidance_scale=5.0, width=64, height=64, generator=torch.Generator().manual_seed(3), output_type="np", **kwargs
        ).images[0]
    finally:
        pipe.scheduler = original
    assert np.abs(expected - run.data.final_array).max() <= 1e-4


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_attention_sums_to_one_over_tokens(tiny_model, guidance):
    run = InstrumentedRun(tiny_model, settings(guidance=guidance)).run_all()
    for record in run.data.records:
        assert record.attention.shape == (run.data.tokens.stored_positions + 1, 8, 8)
        assert record.attention.dtype == np.float16
        totals = record.attention.astype(np.float32).sum(0)
        assert np.abs(totals - 1).max() <= 1e-3


def test_custom_timesteps_are_visited_and_each_step_lands_on_the_next(tiny_model):
    wanted = [999, 800, 600, 350, 120, 20]
    seen = []
    hook = tiny_model.pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    try:
        run = InstrumentedRun(tiny_model, settings(schedule=wanted, scheduler="ddim")).run_all()
    finally:
        hook.remove()
    assert seen == wanted == run.data.timesteps == [r.timestep for r in run.data.records]
    assert [r.next_timestep for r in run.data.records] == wanted[1:] + [None]
    alphas = run.scheduler.alphas_cumprod
    for record in run.data.records:
        # DDIM update from t_k to t_{k+1} (the clean latent after the last step)
        next_alpha = 1.0 if record.next_timestep is None else float(alphas[record.next_timestep])
        eps = record.noise_pred
        expected = next_alpha**0.5 * record.x0_hat + (1 - next_alpha) ** 0.5 * eps
        torch.testing.assert_close(record.next_latents, expected, atol=1e-4, rtol=1e-4)


def test_dpm_solver_follows_a_custom_list(tiny_model):
    wanted = schedule_timesteps("latter", 6, concentration=10)
    run = InstrumentedRun(tiny_model, settings(schedule="latter", concentration=10)).run_all()
    assert isinstance(run.scheduler, DPMSolverMultistepScheduler)
    assert run.data.timesteps == wanted
    first = run.data.records[0]  # the multistep solver's first step is first order: DDIM
    next_alpha = float(run.scheduler.alphas_cumprod[wanted[1]])
    expected = next_alpha**0.5 * first.x0_hat + (1 - next_alpha) ** 0.5 * first.noise_pred
    torch.testing.assert_close(first.next_latents, expected, atol=1e-4, rtol=1e-4)


def test_ddim_uniform_uses_ddim(tiny_model):
    run = InstrumentedRun(tiny_model, settings(scheduler="ddim")).run_all()
    assert isinstance(run.scheduler, DDIMScheduler) and not run.scheduler.config.clip_sample
    alphas = run.scheduler.alphas_cumprod
    for record in run.data.records[:-1]:  # DDIM's own update, x0 never clipped (latents are not images)
        next_alpha = float(alphas[record.next_timestep])
        expected = next_alpha**0.5 * record.x0_hat + (1 - next_alpha) ** 0.5 * record.noise_pred
        torch.testing.assert_close(record.next_latents, expected, atol=1e-4, rtol=1e-4)


def test_two_threads_give_the_same_records_as_in_sequence(tiny_model):
    jobs = [settings(prompt="a cat", seed=1), settings(prompt="a red dog on a circle", seed=2, guidance=7.0)]
    sequential = [InstrumentedRun(tiny_model, job).run_all() for job in jobs]
    parallel = [InstrumentedRun(tiny_model, job) for job in jobs]
    threads = [threading.Thread(target=run.run_all) for run in parallel]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for one, other in zip(sequential, parallel):
        assert_same_records(one, other)


def test_processors_restored_when_a_run_stops_or_fails(tiny_model):
    unet = tiny_model.pipe.unet
    before = unet.attn_processors
    steps = InstrumentedRun(tiny_model, settings()).steps()
    next(steps)
    assert unet.attn_processors != before
    steps.close()  # the user cancelled
    assert unet.attn_processors == before
    steps = InstrumentedRun(tiny_model, settings()).steps()
    next(steps)
    with pytest.raises(KeyError):
        steps.throw(KeyError("failure inside the run"))
    assert unet.attn_processors == before


def test_records_carry_views_and_layers_on_request(tiny_model):
    run = InstrumentedRun(tiny_model, settings(per_group=True, vae_decode_every=3)).run_all()
    layers = FAMILIES["sd1"].cross_attention_sites(tiny_model.pipe.unet)
    assert sorted(k for keys in run.data.attention_groups.values() for k in keys) == sorted(layers)
    for record in run.data.records:
        assert record.preview_noisy.size == (8, 8) and record.preview_prediction.size == (8, 8)  # latent grid
        assert record.image_size == (64, 64)
        assert set(record.group_attention) == set(run.data.attention_groups)
        assert record.latents.device.type == "cpu" and record.latents.shape == (1, 4, 8, 8)
    decoded = [r.index for r in run.data.records if r.prediction_view is not None]
    assert decoded == [3, 6]
    assert run.data.records[0].label == "step 1 of 6, t = 999"
    assert run.data.records[-1].sigma < run.data.records[0].sigma


def test_reproduction_record_reruns_identically(tiny_model):
    run = InstrumentedRun(tiny_model, settings(seed=-1)).run_all()
    saved = run.reproduction()
    assert saved["settings"]["seed"] >= 0 and saved["settings"]["timesteps"] == run.data.timesteps
    assert {"torch", "diffusers", "transformers", "numpy", "python"} <= set(saved["versions"])
    again = InstrumentedRun(tiny_model, RunSettings.from_dict(saved["settings"])).run_all()
    assert_same_records(run, again)


def test_long_prompt_reports_truncation(tiny_model):
    run = InstrumentedRun(tiny_model, settings(prompt="word " * 40))
    assert any("cut" in message for message in run.data.messages)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 5000}, "characters"),
        ({"steps": 0}, "steps must be an integer"),
        ({"steps": 10_000}, "steps must be an integer"),
        ({"width": 60}, "multiple of 8"),
        ({"height": 0}, "height must be an integer"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"guidance": -5}, "guidance"),
        ({"seed": 2**64}, "seed must be an integer"),
        ({"concentration": -1.0}, "concentration"),
        ({"schedule": []}, "must not be empty"),
        ({"schedule": [10, 500]}, "strictly decreasing"),
        ({"scheduler": "euler"}, "scheduler must be one of"),
    ],
)
def test_bad_settings_get_clear_messages(tiny_model, change, message):
    with pytest.raises(ValueError, match=message):
        InstrumentedRun(tiny_model, settings(**change))


@pytest.mark.parametrize("alpha_bar", [0.9, 0.3, 2.0**-24])
def test_every_prediction_type_gives_back_the_clean_latent_and_the_noise(alpha_bar):
    from explainer.families.ddpm import predicted_noise, predicted_original

    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    x_t = a * x0 + s * eps
    outputs = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}
    for kind, output in outputs.items():
        if kind != "v_prediction" and alpha_bar < 1e-6:
            continue  # epsilon and sample models divide by the vanishing signal; v does not
        torch.testing.assert_close(predicted_original(x_t, output, alpha_bar, kind), x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(predicted_noise(x_t, output, alpha_bar, kind), eps, atol=1e-4, rtol=1e-4)


def test_noise_level_is_finite_at_zero_terminal_snr():
    from explainer.families.ddpm import noise_level

    assert noise_level(0.25) == pytest.approx(3**0.5)
    assert noise_level(0.0) == pytest.approx(4096, rel=1e-6)  # floored as diffusers' DPM-Solver++ does


def test_settings_of_an_older_export_still_load():
    """Exports made before the schedule's λ was named "concentration" call it "lam"."""
    old = RunSettings(prompt="a cat", concentration=12.0).to_dict()
    old["lam"] = old.pop("concentration")
    assert RunSettings.from_dict(old).concentration == 12.0


def test_records_keep_the_runs_dtype_and_share_each_steps_latents_with_the_step_before():
    """A half-precision run (as on a GPU; bfloat16 here, which the CPU computes) stores its tensors in
    that dtype, half the bytes, each x_t being the step before's x_{t-1} object; the methods and the
    views read them as before."""
    from explainer.families.sd1_tiny import tiny_pipeline
    from explainer.methods import METHODS
    from explainer.models import LoadedModel

    model = LoadedModel.from_pipeline(tiny_pipeline().to(torch.bfloat16), model_id="tiny-random")
    run = InstrumentedRun(model, settings(steps=3)).run_all().data
    for name in ("latents", "next_latents", "x0_hat", "noise_pred"):
        assert {getattr(record, name).dtype for record in run.records} == {torch.bfloat16}, name
    assert all(later.latents is earlier.next_latents for earlier, later in zip(run.records, run.records[1:]))
    for name, options in (("df-cam", {}), ("df-rise", {"n_masks": 8, "batch_size": 8})):
        saliency = METHODS[name](**options).explain(model, run, 2).saliency
        assert saliency.shape == (8, 8) and np.isfinite(saliency).all() and saliency.max() > saliency.min(), name
    assert run.records[-1].prediction_view is not None and run.final_image.size == (64, 64)

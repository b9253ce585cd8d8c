"""The page's own events: a refused request keeps the last results and says why; a CPU run decodes
the pictures it shows, and a scrubbed step on demand."""

import gradio as gr
import numpy as np
import pytest
import torch

from explainer import config
from explainer.run import InstrumentedRun, RunSettings

from test_app import DATA, PRED_A, STATUS, denoise_args

SKIP = gr.skip()


def page_block(api_name: str):
    """One of the page's (private) events."""
    import app

    return next(block for block in app.demo.fns.values() if block.api_name == f"page_{api_name}")


def page_event(api_name: str):
    """The function behind one of the page's (private) events."""
    return page_block(api_name).fn


def refused_only_on(update, notice: int) -> str:
    """The notice of an update that leaves every other output as it was."""
    assert all(value == SKIP for index, value in enumerate(update) if index != notice)
    return update[notice]


@pytest.fixture(scope="module")
def session():
    """A finished run on the page: the last good results."""
    from ui.denoise import AFTER_RUN_OUTPUTS, CONCEPTS

    updates = list(page_event("denoise")(*denoise_args(steps=3), None))
    outputs = page_block("denoise").outputs
    assert {len(update) for update in updates} == {len(outputs)}
    # then the run's end: what it fills, and the last concept chart again (a streamed update to a tab
    # never opened is lost on the page)
    end = list(updates[-1][:-AFTER_RUN_OUTPUTS])
    assert end.pop(CONCEPTS) is updates[-2][CONCEPTS] and end == [SKIP] * (len(outputs) - AFTER_RUN_OUTPUTS - 1)
    return updates[-2][-AFTER_RUN_OUTPUTS - 2]  # the last step's update carries the session (then the second prompt's row)


def test_a_refused_run_leaves_the_last_results_and_says_what_was_refused(session):
    updates = list(page_event("denoise")(*denoise_args(prompt="  "), session))
    assert len(updates) == 1
    status = refused_only_on(updates[0], STATUS)
    assert "Refused" in status and "prompt is empty" in status and "results shown are from before" in status
    assert len(session.latest()[0].records) == 3  # the last run is still the session's


def test_a_gpu_model_chosen_on_a_cpu_machine_is_refused_on_the_page_with_what_to_do(session):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    update = list(page_event("denoise")(*denoise_args(model_id="CompVis/stable-diffusion-v1-4"), session))[-1]
    assert "needs a GPU, and this machine has none" in refused_only_on(update, STATUS)
    from ui.denoise import on_model_change
    from ui.page import model_choices

    assert "needs a GPU" in on_model_change("CompVis/stable-diffusion-v1-4")[-1]  # said as soon as it is chosen
    assert on_model_change("tiny-random")[-1] == SKIP

    labels = dict((model_id, label) for label, model_id in model_choices(on_gpu=False))
    assert labels["CompVis/stable-diffusion-v1-4"].endswith("needs a GPU, none here")
    assert not labels[config.default_model_id()].endswith("none here")
    ids = [model_id for _, model_id in model_choices(on_gpu=False)]
    assert ids[0] == config.default_model_id()
    tiny = [config.TINY_SD3_MODEL_ID, config.TINY_SDXL_MODEL_ID, config.TINY_FLUX_MODEL_ID]
    assert set(ids[-len(tiny):]) == set(tiny)  # the test models last
    assert all(not label.endswith("none here") for label, _ in model_choices(on_gpu=True))


def test_an_embedded_model_not_trained_here_is_left_out_of_the_list_and_refused_with_the_command(monkeypatch, tmp_path):
    import dataclasses

    from explainer.models import check_loadable
    from ui.page import model_choices

    untrained = dataclasses.replace(config.MODELS[config.EMBEDDED_MMDIT_MODEL_ID], source=str(tmp_path / "absent"))
    monkeypatch.setitem(config.MODELS, untrained.id, untrained)
    assert untrained.id not in [model_id for _, model_id in model_choices(on_gpu=False)]
    with pytest.raises(ValueError, match="has no weights in absent yet: train it first \\(python -m explainer.shapes.train_mmdit"):
        check_loadable(untrained)


def test_other_tabs_keep_their_results_and_clear_the_notice_once_all_is_well(session):
    attention = page_event("attention")
    good = attention("cat", 2, "this step", 1, 3, [], "prediction", 0.8, False, "first prompt", session)
    assert good[-1] == "" and good[2]["steps"] == [2]
    bad = attention("zebra", 2, "this step", 1, 3, [], "prediction", 0.8, False, "first prompt", session)
    assert "'zebra' is not in the prompt" in refused_only_on(bad, len(bad) - 1)
    saliency = page_block("saliency")  # the method and the step, the other controls as the page starts, the session
    controls = [component.value for component in saliency.inputs[2:-1]]
    bad = saliency.fn("DF-CAM", 9, *controls, session)
    assert "step must be between 1 and 3, got 9" in refused_only_on(bad, len(bad) - 1)
    fresh = page_event("concepts")("peak", None)
    assert "No run yet" in refused_only_on(fresh, len(fresh) - 1)


def test_a_fault_is_logged_with_its_trace_and_the_page_keeps_its_results(caplog):
    from ui.page import on_page

    def broken(_):
        raise RuntimeError("out of memory")

    update = on_page(broken, outputs=3)(None)
    assert "something went wrong (RuntimeError: out of memory)" in refused_only_on(update, 3)
    assert any(record.exc_info for record in caplog.records if record.name == "diffusion_xray")


def test_a_cpu_run_decodes_only_the_steps_it_shows_and_a_scrubbed_step_on_demand(monkeypatch):
    """The views a CPU run never shows are not decoded; scrubbing to one decodes it, equal to the
    view the run decodes itself."""
    from explainer.models import load_model
    from ui import gpu
    from ui.denoise import denoise, show_step

    monkeypatch.setattr(gpu, "preferred_device", lambda: (torch.device("cpu"), torch.float32))
    updates, session = [], None
    for *outputs, session in denoise(*denoise_args(steps=8), None):
        updates.append(outputs)
    records = session.run(0).records
    shown = {update[DATA]["step"] for update in updates if update[PRED_A] != SKIP}
    decoded = {record.index for record in records if record.prediction_view is not None}
    assert decoded == shown | {8} and len(decoded) < 8
    step = min(set(range(1, 9)) - decoded)
    scrubbed = show_step(session, step)
    assert f"step {step} of 8" in scrubbed[STATUS] and records[step - 1].prediction_view is not None
    model = load_model("tiny-random")
    settings = RunSettings.from_dict(session.run(0).settings.to_dict() | {"vae_decode_every": 1})
    every_step = InstrumentedRun(model, settings).run_all().data.records[step - 1]
    for view in ("prediction_view", "noisy_view"):
        np.testing.assert_array_equal(np.asarray(getattr(records[step - 1], view)), np.asarray(getattr(every_step, view)))


def test_the_run_decodes_at_the_models_cadence_on_a_gpu_and_the_last_step_on_a_cpu():
    sd = config.MODELS["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert config.run_decode_every(sd, on_gpu=True) == sd.vae_decode_every > 0
    assert config.run_decode_every(sd, on_gpu=False) == 0


def test_decoding_in_batches_equals_decoding_one_by_one():
    from explainer.models import load_model

    model = load_model("tiny-random")
    latents = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    batched = model.decode_in_batches(latents, batch_size=2)
    alone = [model.decode(latent)[0] for latent in latents]
    for one, other in zip(batched, alone, strict=True):
        assert np.abs(np.asarray(one, np.int16) - np.asarray(other, np.int16)).max() <= 1


def test_a_shared_cached_picture_is_never_read_half_written(tmp_path):
    """Visitors who get the same picture at once share its cached file: saving it again while it
    is downloaded must not truncate it (CI once failed on that: "peer closed connection")."""
    import threading
    import time

    from gradio import processing_utils
    from PIL import Image

    import app  # noqa: F401  (building the page puts the atomic cache in place)

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    path = processing_utils.save_pil_to_cache(picture, str(tmp_path))
    size, short_reads, stop = len(open(path, "rb").read()), [], time.time() + 1.0

    def save():
        while time.time() < stop:
            assert processing_utils.save_pil_to_cache(picture, str(tmp_path)) == path

    def read():
        while time.time() < stop:
            with open(path, "rb") as file:
                if len(file.read()) != size:
                    short_reads.append(1)

    threads = [threading.Thread(target=work) for work in (save, save, read, read)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert not short_reads, f"{len(short_reads)} reads found the picture half written"


def test_the_second_prompts_pictures_show_only_when_a_second_prompt_is_given():
    from ui.denoise import AFTER_RUN_OUTPUTS

    for prompt_b, visible in (("", False), ("a dog", True)):
        updates = list(page_event("denoise")(*denoise_args(steps=2, prompt_b=prompt_b), None))
        row = [update[-AFTER_RUN_OUTPUTS - 1] for update in updates]
        assert row[0] == gr.update(visible=visible) and all(value == SKIP for value in row[1:])


def test_the_word_scale_toggle_redraws_the_shown_steps_overlays_and_the_colour_bar(session):
    from ui.denoise import rescale_words, word_scale_bar

    shared, shared_bar = rescale_words(session, 3, False)
    own, own_bar = rescale_words(session, 3, True)
    assert len(shared) == len(own) == len(session.latest()[0].tokens.word_texts)
    assert shared_bar is word_scale_bar(False) and own_bar is word_scale_bar(True) and shared_bar is not own_bar
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(shared, own))
    assert rescale_words(None, 3, True) == (SKIP, own_bar)  # before a run: only the bar


def test_the_first_view_is_a_finished_example_in_a_session_of_its_own():
    from ui import example
    from ui.denoise import AFTER_RUN_OUTPUTS, PAGE_OUTPUTS, STATUS

    example.start()
    first = example.first_view(None)
    assert len(first) == PAGE_OUTPUTS == len(page_block("denoise").outputs)
    session = first[-AFTER_RUN_OUTPUTS - 2]
    run = session.latest()[0]
    assert run.done and len(run.records) == config.MODELS[config.default_model_id()].steps
    assert first[0] is not None and first[6]  # the prediction and the word overlays
    assert "An example run" in first[STATUS] and f"step {len(run.records)} of {len(run.records)}" in first[STATUS]
    assert example.first_view(None)[-AFTER_RUN_OUTPUTS - 2] is not session  # each visitor their own
    assert example.first_view(session) == (SKIP,) * PAGE_OUTPUTS  # a visitor who has run something keeps it


def test_each_saliency_preset_is_a_valid_option_set_and_the_papers_follows_the_variants_registry():
    from explainer.methods import METHODS
    from explainer.methods.variants import VARIANTS
    from ui.saliency import PAPER, RECOMMENDED, SALIENCY_METHODS, preset
    from ui.settings import APP

    for name in SALIENCY_METHODS.values():
        for which in (RECOMMENDED, PAPER):
            METHODS[name](**preset(name, which))  # the method's own checks accept it
    assert preset("df-rise", RECOMMENDED)["n_masks"] == APP.rise_masks
    paper_cam = preset("df-cam", PAPER)
    assert all(paper_cam[key] == value for key, value in VARIANTS["df-cam-paper"].options.items())
    assert preset("df-cam", RECOMMENDED)["target"] != paper_cam["target"]


def test_the_saliency_summary_line_gives_the_numbers_that_matter_in_words():
    from ui.saliency import summary_line

    data = {"method": "df-rise", "step": 15, "timestep": 249, "seconds": 2.345, "denoiser_calls": 7,
            "insertion_auc": 0.41234, "deletion_auc": 0.6789}
    line = summary_line(data)
    assert line.startswith("**DF-RISE** at step 15 (t = 249)")
    assert "insertion AUC **0.412** (lower is better)" in line and "deletion AUC **0.679** (higher is better)" in line
    assert line.endswith("2.3 s, 7 model calls")
    assert "AUC" not in summary_line({k: v for k, v in data.items() if "auc" not in k})  # not scored


def test_every_visible_label_hint_and_caption_is_plain_language():
    """No formulas or section numbers where a visitor reads (they stay in docs/methods.md)."""
    import app

    formula = ("‖", "ε", "²", "½", "λ", "§", "Σ", "x_t", "x̂", "√")
    texts = []
    for block in app.demo.blocks.values():
        for attribute in ("label", "info"):
            value = getattr(block, attribute, None)
            if isinstance(value, str):
                texts.append(value)
        if isinstance(block, gr.Markdown) and isinstance(block.value, str):
            texts.append(block.value)
    assert len(texts) > 50
    offending = [text for text in texts if any(mark in text for mark in formula)]
    assert not offending, offending


def test_the_guidance_comparison_shows_a_column_per_value_given():
    compare = page_event("compare_guidance")
    updates = list(compare("tiny-random", "a cat", "", 1, 2, 64, 64, "uniform", 2.0, "", "1, 4"))
    columns = updates[-1][-5:-1]  # the four columns, then the notice
    assert columns == (gr.update(visible=True),) * 2 + (gr.update(visible=False),) * 2 and updates[-1][-1] == ""
    refused = list(compare("tiny-random", "a cat", "", 1, 2, 64, 64, "uniform", 2.0, "", "1"))[-1]
    assert "give between 2 and 4 guidance values" in refused_only_on(refused, len(refused) - 1)

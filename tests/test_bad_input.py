"""Every row of docs/bad-input.md, sent through gradio_client: a clear message, then the app still serves."""

import json
import re
import logging
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from explainer import config
from explainer.methods import relevance as relevance_module

from test_app import DATA, denoise_args

TABLE = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text(encoding="utf-8")

# (what is sent, the /denoise argument changes, the message the caller gets; None: it works)
DENOISE_ROWS = [
    ("empty prompt", {"prompt": ""}, "prompt is empty"),
    ("whitespace prompt", {"prompt": "   \n "}, "prompt is empty"),
    ("2,000-character prompt", {"prompt": "a cat " * 333 + "ab"}, "the limit is 1000"),
    ("unicode and emoji", {"prompt": "un café ☕ 😀 にゃんこ"}, None),
    ("steps 0", {"steps": 0}, "less than minimum value 1"),
    ("steps -1", {"steps": -1}, "less than minimum value 1"),
    ("steps 10,000", {"steps": 10_000}, "greater than maximum value 100"),
    # JSON has no NaN or inf: gradio_client refuses to send them (the raw-HTTP test below sends them)
    ("guidance NaN", {"guidance": float("nan")}, "Out of range float values are not JSON compliant"),
    ("guidance inf", {"guidance": float("inf")}, "Out of range float values are not JSON compliant"),
    ("guidance -5", {"guidance": -5}, "less than minimum value 0"),
    ("seed -1", {"seed": -1}, None),
    ("seed 2^64", {"seed": 2**64}, "seed must be an integer in [0, 9223372036854775807]"),
    ("width 60 (not a multiple of 8)", {"width": 60}, "width must be a multiple of 8"),
    ("width 0", {"width": 0}, "less than minimum value 8"),
    ("height 10,000", {"height": 10_000}, "greater than maximum value 1024"),
    ("unknown model id", {"model_id": "nobody/nothing"}, "not in the list of choices"),
    ("model id not in the config", {"model_id": "runwayml/stable-diffusion-v1-5"}, "not in the list of choices"),
    ("empty timestep list", {"schedule": "custom", "custom": ""}, "must not be empty"),
    ("timesteps not decreasing", {"schedule": "custom", "custom": "100, 500"}, "strictly decreasing"),
    ("timesteps out of range", {"schedule": "custom", "custom": "1500, 10"}, "out of range"),
    ("timesteps not numbers", {"schedule": "custom", "custom": "999, soon"}, "comma-separated integers"),
    ("λ negative", {"concentration": -1}, "less than minimum value 0"),
]


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


@pytest.mark.parametrize("label, changes, message", DENOISE_ROWS, ids=[row[0] for row in DENOISE_ROWS])
def test_denoise_bad_input(client, label, changes, message, request):
    assert f"| {label} |" in TABLE, "the docs table must list every tested input"
    if message is None:
        updates = list(client.submit(*denoise_args(**({"steps": 2} | changes)), api_name="/denoise"))
        assert [summary["step"] for update in updates for summary in update[DATA]["steps"]] == [1, 2]
        assert updates[-1][DATA]["seed"] >= 0  # the seed used is reported
    else:
        assert message in TABLE
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("^", r"\^")):
            client.predict(*denoise_args(**({"steps": 2} | changes)), api_name="/denoise")
    # The app keeps serving: after every refusal in the full suite; in the fast tier the next test's run shows it
    if message is not None and request.config.getoption("--full"):
        assert client.predict(*denoise_args(steps=2), api_name="/denoise")[DATA]["step"] == 2


def test_a_word_not_in_the_prompt(client):
    assert "| a word not in the prompt |" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    with pytest.raises(Exception, match="'zebra' is not in the prompt. Its words are: 'a', 'cat'"):
        client.predict("zebra", 1, "this step", 1, 2, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    with pytest.raises(Exception, match="step must be between 1 and 2, got 7"):
        client.predict("cat", 7, "this step", 1, 2, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    assert "| a layer group the model does not have |" in TABLE
    with pytest.raises(Exception, match=r"Unknown layer groups \['up 64×64'\]; this model has \['down 8×8', 'down 4×4'"):
        client.predict("cat", 1, "this step", 1, 2, ["up 64×64"], "prediction", 0.8, False, "first prompt", api_name="/attention")
    assert client.predict("cat", 1, "this step", 1, 2, [], "prediction", 0.8, False, "first prompt", api_name="/attention")[2]["steps"] == [1]


@pytest.mark.parametrize("value, message", [("NaN", "guidance must be a finite number"), ("Infinity", "greater than maximum value 30")])
def test_non_finite_guidance_over_raw_http(url, value, message):
    """Sent as raw JSON (which Python's parser accepts), the server still answers clearly."""
    import httpx

    args = denoise_args(steps=2)
    args[6] = "__GUIDANCE__"
    body = json.dumps({"data": args}).replace('"__GUIDANCE__"', value)
    event = httpx.post(f"{url}gradio_api/call/denoise", content=body, headers={"content-type": "application/json"}).json()
    stream = httpx.get(f"{url}gradio_api/call/denoise/{event['event_id']}", timeout=60).text
    assert "event: error" in stream and message in stream


@pytest.mark.skipif(config.default_model_id() != config.EMBEDDED_MODEL_ID, reason="the embedded model is not in assets/")
def test_words_outside_the_embedded_vocabulary(client):
    assert "| words outside the embedded model's vocabulary |" in TABLE
    args = denoise_args(steps=2, model_id=config.EMBEDDED_MODEL_ID, prompt="a zebra on the left", width=64, height=64)
    with pytest.raises(Exception, match="Words not in the embedded/shapes-ldm model's vocabulary: 'zebra'"):
        client.predict(*args, api_name="/denoise")


@pytest.mark.parametrize("label, masks, message", [("N masks 0", 0, "less than minimum value 1"), ("N masks 10^9", 10**9, "greater than maximum value 4000")])
def test_mask_counts(client, label, masks, message):
    assert f"| {label} |" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    with pytest.raises(Exception, match=message):
        client.predict("DF-RISE", 1, masks, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency")


def test_an_unknown_rectifier_or_cam_option(client):
    assert "| an unknown rectifier (" in TABLE and "| an unknown DF-CAM target, weighting or layer scale |" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    with pytest.raises(Exception, match="'square' .* is not in the list of choices"):
        client.predict("square", api_name="/relevance")
    with pytest.raises(Exception, match="'square' .* is not in the list of choices"):
        client.predict("DF-CAM", 1, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "square",
                       api_name="/saliency")
    with pytest.raises(Exception, match="'energy' .* is not in the list of choices"):
        client.predict("DF-CAM", 1, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "relu",
                       "energy", api_name="/saliency")
    with pytest.raises(Exception, match="'score-cam' .* is not in the list of choices"):
        client.predict("DF-CAM", 1, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "relu",
                       "guidance", "score-cam", api_name="/saliency")
    with pytest.raises(Exception, match="'max' .* is not in the list of choices"):
        client.predict("DF-CAM", 1, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "relu",
                       "guidance", "layercam", "max", api_name="/saliency")
    assert client.predict("relu", api_name="/relevance")[2]["rectify"] == "relu"


def test_running_out_of_gpu_memory(client, monkeypatch):
    """The app serves in this process: the relevance budget is set below what the embedded model keeps."""
    assert "| a method or a run that outgrows the GPU's memory" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    monkeypatch.setattr(relevance_module, "memory_budget", lambda device, share: 1024)
    with pytest.raises(Exception, match=r"Token relevance keeps every attention map of the step .* explain a run of a smaller picture"):
        client.predict("abs", api_name="/relevance")
    monkeypatch.undo()
    assert client.predict("abs", api_name="/relevance")[2]["rectify"] == "abs"


def test_work_longer_than_a_zerogpu_call(client, monkeypatch):
    """On ZeroGPU, ``@spaces.GPU`` asks the call's duration function before the call; here a wrapper does
    the same, and the longest call is set below what DF-RISE on the tiny model needs."""
    import dataclasses

    from ui import gpu, settings

    assert "| work longer than one ZeroGPU call may take (" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    explain = gpu.explain_on_device
    monkeypatch.setattr(gpu, "explain_on_device", lambda *args: (gpu.explain_duration(*args), explain(*args))[1])
    monkeypatch.setattr(settings, "APP", dataclasses.replace(settings.APP, max_gpu_seconds=10))
    with pytest.raises(Exception, match=r"This needs about \d+ s of GPU time, more than one GPU call on this Space may take "
                                        r"\(10 s\)\. Ask for fewer masks or samples"):
        client.predict("DF-RISE", 1, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency")
    monkeypatch.undo()
    assert client.predict("DF-RISE", 1, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency")


def test_bad_guidance_lists_and_concept_scores(client):
    guidance_args = ["tiny-random", "a cat", "", 1, 2, 64, 64, "uniform", 2.0, ""]
    for label, values, message in (("one guidance value, or five", "3", "give between 2 and 4 guidance values, got 1"),
                                   ("one guidance value, or five", "1, 2, 3, 4, 5", "give between 2 and 4 guidance values, got 5"),
                                   ("guidance values that are not numbers", "1, lots", "must be numbers separated by commas")):
        assert f"| {label} |" in TABLE
        with pytest.raises(Exception, match=message):
            client.predict(*guidance_args, values, api_name="/compare_guidance")
    assert "| a spot outside the picture |" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    with pytest.raises(Exception, match="x must be a fraction of the picture between 0 and 1, got 1.5"):
        client.predict(1.5, 0.5, 1, "first prompt", api_name="/spot")
    assert client.predict(0.5, 0.5, 1, "first prompt", api_name="/spot")[2]["step"] == 1
    assert "| concept maps of a UNet model |" in TABLE
    with pytest.raises(Exception, match="ConceptAttention needs a model whose blocks attend jointly over image and text"):
        client.predict("cat, dog", 1, "all", "first prompt", api_name="/concept_maps")
    assert "| an unknown quick concept score |" in TABLE
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    with pytest.raises(Exception, match="'sum' .* is not in the list of choices"):
        client.predict("sum", api_name="/concepts")
    assert client.predict("mass", api_name="/concepts")[2]["score"] == "mass"


def test_an_unknown_run_id_is_refused_with_a_message_naming_run_id(client):
    assert "| an unknown run id |" in TABLE
    with pytest.raises(Exception, match="Unknown run_id 'no-such-run': no run has that id"):
        client.predict("peak", "no-such-run", api_name="/concepts")
    with pytest.raises(Exception, match="Unknown run_id"):
        client.predict("no-such-run", api_name="/export")


def test_steps_are_checked_against_the_runs_own_count(client):
    """After a run longer than the page's first slider maximum (20), every step of it can be asked for."""
    assert "| a step beyond the run |" in TABLE
    client.predict(*denoise_args(steps=40), api_name="/denoise")
    _, _, summary = client.predict("cat", 35, "this step", 1, 40, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    assert summary["steps"] == [35]
    _, _, summary = client.predict("cat", 40, "range of steps", 30, 40, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    assert summary["steps"] == list(range(30, 41))
    data = client.predict("DF-CAM", 35, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency")[3]
    assert data["step"] == 35
    with pytest.raises(Exception, match=r"step must be between 1 and 40, got 41"):
        client.predict("cat", 41, "this step", 1, 40, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    with pytest.raises(Exception, match=r"range end must be between 1 and 40, got 50"):
        client.predict("cat", 1, "range of steps", 1, 50, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    with pytest.raises(Exception, match=r"step must be between 1 and 40, got 41"):
        client.predict("DF-CAM", 41, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency")
    with pytest.raises(Exception, match=r"less than minimum value 1"):
        client.predict("DF-CAM", 0, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the Hub check answers instead")
def test_a_gpu_model_on_a_machine_without_one_says_what_to_do(client):
    assert "| a GPU model on a machine without one |" in TABLE
    with pytest.raises(Exception, match=r"needs a GPU, and this machine has none\. To explain a model here, choose "
                                        r"'Shapes world \(embedded, runs on CPU\)'"):
        client.predict(*denoise_args(steps=2, model_id="CompVis/stable-diffusion-v1-4"), api_name="/denoise")
    assert client.predict(*denoise_args(steps=2), api_name="/denoise")[DATA]["step"] == 2


def test_refusals_are_one_log_line_each_not_a_traceback(client, capfd, caplog):
    """The app's own refusals and Gradio's (a slider's bound, a choice not in the list) alike."""
    caplog.set_level(logging.WARNING, logger="diffusion_xray")
    client.predict(*denoise_args(steps=2), api_name="/denoise")
    capfd.readouterr()
    refused = [
        lambda: client.predict(*denoise_args(prompt=" "), api_name="/denoise"),  # the app's check
        lambda: client.predict(*denoise_args(steps=10_000), api_name="/denoise"),  # the slider's bound
        lambda: client.predict("square", api_name="/relevance"),  # a choice not in the list
        lambda: client.predict("zebra", 1, "this step", 1, 2, [], "prediction", 0.8, False, "first prompt", api_name="/attention"),
    ]
    for request in refused:
        with pytest.raises(Exception):
            request()
    assert client.predict(*denoise_args(steps=2), api_name="/denoise")[DATA]["step"] == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = [record.getMessage() for record in caplog.records if record.name == "diffusion_xray"]
    assert len(lines) == len(refused) and all(line.startswith("refused /") for line in lines)
    assert "prompt is empty" in lines[0] and "greater than maximum value 100" in lines[1] and "/attention" in lines[3]


def picture_file(folder: Path, name: str, make) -> str:
    path = folder / name
    make(path)
    return str(path)


IMAGE_ROWS = [  # (label, how the file is made, changes to the other arguments, message)
    ("a file that is not a picture", lambda p: p.write_bytes(b"not pixels"), {}, "This is not an image that can be read"),
    ("a 1×1 picture", lambda p: Image.new("RGB", (1, 1)).save(p), {}, "The image is 1×1 pixels; each side must be at least 8."),
    ("a 16-bit picture", lambda p: Image.new("I;16", (64, 64)).save(p), {},
     "The image has pixel mode 'I;16' (16-bit or floating point); save it as an 8-bit RGB or greyscale picture"),
    ("no prompt and no concepts", lambda p: Image.new("RGB", (64, 64)).save(p), {"prompt": "", "concepts": ""},
     "Give a prompt or some concepts: the model needs words to look for."),
    ("an unknown trajectory", lambda p: Image.new("RGB", (64, 64)).save(p), {"mode": "rewind"}, "not in the list of choices"),
    ("a picture of another size", lambda p: Image.new("RGB", (200, 100)).save(p), {}, None),
]


@pytest.mark.parametrize("label, make, changes, message", IMAGE_ROWS, ids=[row[0] for row in IMAGE_ROWS])
def test_explain_image_bad_input(client, tmp_path, label, make, changes, message):
    assert f"| {label} |" in TABLE, "the docs table must list every tested input"
    arguments = dict(model_id="tiny-random", picture=handle_file(picture_file(tmp_path, "input.png", make)), prompt="a cat",
                     concepts="cat", mode="noise", steps=2, guidance=1.0, seed=1) | changes
    if message is None:
        *_, status, _, _, data = client.predict(*arguments.values(), api_name="/explain_image")
        assert "resized from 200×100 to the run's 64×64" in status and data["step"] == 2
    else:
        assert message in TABLE
        with pytest.raises(Exception, match=re.escape(message)):
            client.predict(*arguments.values(), api_name="/explain_image")

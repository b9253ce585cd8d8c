"""The launched app, driven through gradio_client as an API user would."""

import ast
import asyncio
import dataclasses
import json
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client

from explainer import config

# /denoise outputs, in order
PRED_A, NOISY_A, PRED_B, NOISY_B, STATUS, CHART, OVERLAYS, CONCEPTS, DATA = range(9)
ATTENTION_ARGS = ("cat", 2, "this step", 1, 3, [], "prediction", 0.8, False, "first prompt")  # after a 3-step run


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


def denoise_kwargs(prompt="a cat on a red circle", steps=4, **changes) -> dict:
    """/denoise's arguments by name: a small run of the tiny model."""
    args = dict(
        model_id="tiny-random", prompt=prompt, prompt_b="", negative="", seed=1, steps=steps, guidance=5.0,
        width=64, height=64, schedule="uniform", concentration=60, custom="",
    )
    return args | changes


def denoise_args(*args, **changes) -> list:
    return list(denoise_kwargs(*args, **changes).values())


def test_only_named_endpoints_are_public(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/denoise", "/attention", "/spot", "/concept_maps", "/concepts", "/relevance",
                              "/compare_schedules", "/compare_guidance", "/saliency", "/explain_image", "/export"}


def test_denoise_streams_the_steps_and_every_steps_facts(client):
    updates = list(client.submit(*denoise_args(steps=4), api_name="/denoise"))
    shown = [update[DATA]["step"] for update in updates]
    assert shown == sorted(set(shown)) and shown[-1] == 4  # steps overtaken before the page was ready are not drawn...
    covered = [summary["step"] for update in updates for summary in update[DATA]["steps"]]
    assert covered == [1, 2, 3, 4]  # ... but every step's facts go out, with the next update
    last = updates[-1]
    assert last[DATA]["words"] == ["a", "cat", "on", "a", "red", "circle"]
    assert set(last[DATA]["token_scores"]) == {"0:a", "1:cat", "2:on", "3:a", "4:red", "5:circle"}
    assert last[PRED_A].endswith((".webp", ".png")) and "step 4 of 4" in last[STATUS]
    assert last[PRED_B] is None
    assert len(last[OVERLAYS]) == 6  # one overlay per word


def test_a_slow_page_skips_pictures_not_steps_and_does_not_hold_the_run_back():
    from ui.denoise import denoise

    updates, session = [], None
    for *outputs, session in denoise(*denoise_args(steps=8), None):
        updates.append(outputs[DATA])
        time.sleep(0.3)  # a page that takes long to draw: the run meanwhile goes on
    assert len(updates) < 8 and updates[-1]["step"] == 8
    assert [summary["step"] for data in updates for summary in data["steps"]] == list(range(1, 9))
    assert len(session.run(0).records) == 8  # the scrubber has every step


def test_while_pictures_wait_the_page_still_gets_news_of_the_steps(monkeypatch):
    from explainer.models import load_model
    from ui import gpu, settings
    from ui.denoise import denoise

    # no share of the time for pictures (only the first and last updates have them), no gap allowed
    monkeypatch.setattr(settings, "APP", dataclasses.replace(settings.APP, cpu_stream_share=0.0, max_update_gap_s=0.0))
    monkeypatch.setattr(gpu, "preferred_device", lambda: (torch.device("cpu"), torch.float32))
    unet = load_model("tiny-random").pipe.unet
    hook = unet.register_forward_pre_hook(lambda *_: time.sleep(0.1))  # steps slower than a light update
    try:
        updates = [outputs for *outputs, _ in denoise(*denoise_args(steps=8), None)]
    finally:
        hook.remove()
    pictured = [not isinstance(update[PRED_A], dict) for update in updates]
    assert pictured[0] and pictured[-1] and not any(pictured[1:-1]) and len(updates) > 2
    assert all(isinstance(update[OVERLAYS], dict) and isinstance(update[CONCEPTS], dict) for update in updates[1:-1])
    assert [update[DATA]["step"] for update in updates] == sorted({update[DATA]["step"] for update in updates})
    assert [summary["step"] for update in updates for summary in update[DATA]["steps"]] == list(range(1, 9))
    assert all(f"step {update[DATA]['step']} of 8" in update[STATUS] for update in updates)


def test_second_prompt_runs_from_the_same_noise(client):
    last = list(client.submit(*denoise_args(prompt_b="a dog", steps=3), api_name="/denoise"))[-1]
    assert last[PRED_B] is not None
    assert last[DATA]["second_prompt"]["step"] == 3


def test_custom_schedule_through_the_api(client):
    updates = list(client.submit(*denoise_args(schedule="custom", custom="999, 500, 100"), api_name="/denoise"))
    assert [summary["timestep"] for u in updates for summary in u[DATA]["steps"]] == [999, 500, 100]


NEWER_FAMILIES = [  # (model, prompt, its last word, concepts, the spot's row at the picture's middle)
    *((model_id, "a cat", "cat", "cat, dog", 4) for model_id in (config.TINY_SD3_MODEL_ID, config.TINY_SDXL_MODEL_ID, config.TINY_FLUX_MODEL_ID)),
    pytest.param(config.EMBEDDED_MMDIT_MODEL_ID, "a red circle", "circle", "circle, square", 8, id="embedded-mmdit",
                 marks=[pytest.mark.slow,  # 30 s (DF-LIME's 1000 samples on real weights): the tiny ones cover every change
                        pytest.mark.skipif(config.weights_missing(config.MODELS[config.EMBEDDED_MMDIT_MODEL_ID]),
                                           reason="no shapes-mmdit in assets/")]),
]


@pytest.mark.parametrize("model_id, prompt, word, concepts, middle_row", NEWER_FAMILIES)
def test_every_endpoint_serves_the_newer_families_end_to_end(url, model_id, prompt, word, concepts, middle_row):
    """A model of each newer family (tiny ones, and the embedded MM-DiT), through gradio_client: the
    run, its views and every method."""
    family = config.MODELS[model_id].family
    words = {f"{i}:{w}" for i, w in enumerate(prompt.split())}
    session_client = Client(url, verbose=False)
    last = list(session_client.submit(*denoise_args(model_id=model_id, prompt=prompt, steps=3), api_name="/denoise"))[-1]
    assert last[DATA]["step"] == 3 and last[PRED_A] is not None and set(last[DATA]["token_scores"]) == words
    assert session_client.predict(word, 2, "all steps", 1, 3, [], "prediction", 0.8, False, "first prompt",
                                  api_name="/attention")[2]["steps"] == [1, 2, 3]
    assert session_client.predict(0.5, 0.5, 2, "first prompt", api_name="/spot")[2]["row"] == middle_row
    assert session_client.predict("mass", api_name="/concepts")[2]["steps"] == [1, 2, 3]
    assert set(session_client.predict("abs", api_name="/relevance")[2]["series"]) == words
    for method in ("DF-RISE", "DF-CAM", "DF-LIME"):
        result = session_client.predict(method, 2, 8, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, True,
                                        api_name="/saliency")[3]
        assert result["step"] == 2 and 0 <= result["insertion_auc"] <= 1
    if family in ("sd3", "flux"):
        shares, raw, data = session_client.predict(concepts, 2, "all", "first prompt", api_name="/concept_maps")
        assert len(shares) == len(raw) == 2 and abs(sum(data["shares"].values()) - 1) < 1e-4
    else:
        with pytest.raises(Exception, match="needs a model whose blocks attend jointly"):
            session_client.predict(concepts, 2, "all", "first prompt", api_name="/concept_maps")
    archive, _ = session_client.predict(api_name="/export")
    assert archive.endswith(".zip")


def test_attention_concepts_and_export_read_the_session_run(url):
    session_client = Client(url, verbose=False)  # a client of its own: a session of its own
    list(session_client.submit(*denoise_args(steps=3), api_name="/denoise"))
    overlay, npy, summary = session_client.predict(
        "cat", 2, "this step", 1, 3, [], "prediction", 0.8, False, "first prompt", api_name="/attention"
    )
    saliency = np.load(npy)
    assert saliency.shape == (8, 8) and summary["steps"] == [2] and summary["word"] == "cat"
    _, _, summary = session_client.predict("cat", 3, "all steps", 1, 3, [], "noisy", 0.5, False, "first prompt", api_name="/attention")
    assert summary["steps"] == [1, 2, 3] and summary["layers"] == "all"
    _, npy, summary = session_client.predict("cat", 2, "this step", 1, 3, ["up 8×8"], "prediction", 0.8, False, "first prompt", api_name="/attention")
    assert summary["groups"] == ["up 8×8"] and len(summary["layers"]) == 2 and all(k.startswith("up_blocks.1.") for k in summary["layers"])
    assert np.load(npy).shape == (8, 8) and not np.allclose(np.load(npy), saliency)
    with pytest.raises(Exception, match="Unknown layer groups"):
        session_client.predict("cat", 2, "this step", 1, 3, ["up 64×64"], "prediction", 0.8, False, "first prompt", api_name="/attention")
    with pytest.raises(Exception, match="'dog' is not in the prompt"):
        session_client.predict("dog", 1, "this step", 1, 3, [], "prediction", 0.8, False, "first prompt", api_name="/attention")
    chart, bars, data = session_client.predict(api_name="/concepts")
    assert data["steps"] == [1, 2, 3] and set(data["series"]) == {"0:a", "1:cat", "2:on", "3:a", "4:red", "5:circle"}
    _, _, relevance = session_client.predict(api_name="/relevance")
    assert relevance["score"] == "token relevance" and relevance["steps"] == [1, 2, 3] and relevance["rectify"] == "abs"
    assert set(relevance["series"]) == set(data["series"])
    _, _, paper = session_client.predict("relu", api_name="/relevance")
    assert paper["rectify"] == "relu" and paper["series"] != relevance["series"]
    archive, gif = session_client.predict(api_name="/export")
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        record = json.loads(opened.read("run.json"))
    assert "step_001/attention.npy" in names and "final.png" in names
    assert record["reproduction"]["settings"]["seed"] == 1 and len(record["steps"]) == 3


def test_a_run_id_names_the_run_for_a_client_without_that_session(url):
    """What an MCP agent does: /denoise's run id, passed by a client with no session of that run,
    reads that run; and a later run of the first client does not change what the id names."""
    first = Client(url, verbose=False)
    updates = list(first.submit(*denoise_args(steps=3), api_name="/denoise"))
    assert all(len(update) == DATA + 1 for update in updates)  # the outputs API clients had before run ids
    run_id = updates[-1][DATA]["run_id"]
    _, own_npy, own = first.predict(*ATTENTION_ARGS, api_name="/attention")  # the session's run, as before
    _, npy, summary = Client(url, verbose=False).predict(*ATTENTION_ARGS, run_id, api_name="/attention")
    assert summary == own and np.array_equal(np.load(npy), np.load(own_npy))
    first.predict(*denoise_args(prompt="a dog", steps=2), api_name="/denoise")
    assert first.predict(*ATTENTION_ARGS, run_id, api_name="/attention")[2] == own


def test_explain_image_streams_a_pictures_trajectory_that_the_other_tools_explain(url, tmp_path):
    """A rendered scene uploaded as a file: the noise trajectory streams, the picture is resized with a
    message, and the run id names it for /attention and /export as a generation's does."""
    from gradio_client import handle_file
    from PIL import Image

    from explainer.shapes.world import generate_scene

    path = tmp_path / "scene.png"
    Image.fromarray(generate_scene(7, split="any").image).resize((96, 96)).save(path)
    caller = Client(url, verbose=False)
    updates = list(caller.submit("tiny-random", handle_file(str(path)), "a cat on a red circle", "cat, dog", "invert", 3, 1.0,
                                 1, api_name="/explain_image"))
    source, prediction, noisy, status, overlays, concepts, data = updates[-1]
    assert data["step"] == 3 and data["source"]["mode"] == "invert" and 0 <= data["source"]["reconstruction_error"] <= 1
    assert "resized from 96×96" in status and "Not in the prompt, so no map on this UNet model: dog" in status
    assert len(overlays) == 6 and [item["caption"] for item in concepts] == ["cat"]
    assert Image.open(source).size[0] >= 64
    _, npy, summary = Client(url, verbose=False).predict(*ATTENTION_ARGS[:-1], "first prompt", data["run_id"], api_name="/attention")
    assert summary["steps"] == [2] and np.load(npy).shape == (8, 8)
    with pytest.raises(Exception, match="not an image that can be read"):
        caller.predict("tiny-random", handle_file(__file__), "a cat", "", "noise", 2, 1.0, 1, api_name="/explain_image")
    with pytest.raises(Exception, match="Give a prompt or some concepts"):
        caller.predict("tiny-random", handle_file(str(path)), "", "", "noise", 2, 1.0, 1, api_name="/explain_image")


def test_the_run_ids_keep_the_latest_runs_only():
    from ui.session import RunIds

    ids = RunIds(limit=2)
    first, *later = [ids.add([f"run {n}"]) for n in range(3)]
    folder = ids.sessions[later[0]].folder
    assert len({first, *later}) == 3 and all(len(run_id) >= 20 for run_id in later)  # unguessable
    assert [ids.get(run_id).run(0) for run_id in later] == ["run 1", "run 2"]
    with pytest.raises(ValueError, match="Unknown run_id.*the last 2 runs"):
        ids.get(first)  # the oldest is dropped...
    ids.add(["run 3"])
    assert not folder.exists()  # ... with its files


def test_the_mcp_schema_describes_every_tool_and_argument_from_the_docstrings(url):
    tools = {tool["name"]: tool for tool in httpx.get(f"{url}gradio_api/mcp/schema").json()}
    assert set(tools) == {"denoise", "attention", "spot", "concept_maps", "concepts", "relevance", "compare_schedules",
                          "compare_guidance", "saliency", "explain_image", "export_run"}
    for tool in tools.values():  # a docstring's Args name every argument (a misspelt name leaves one undescribed)
        assert tool["description"] and all(p["description"] for p in tool["inputSchema"]["properties"].values()), tool["name"]
    attention = tools["attention"]["inputSchema"]
    assert "session" not in attention["properties"] and "run_id" not in attention.get("required", [])
    assert attention["properties"]["run_id"]["description"].startswith("The run_id that /denoise or /explain_image returned")
    assert attention["properties"]["word"]["description"].startswith("A word of the prompt")
    assert "run_id" in tools["denoise"]["description"]
    assert "required" not in tools["denoise"]["inputSchema"]  # every argument has the page's default: a prompt is enough


def test_an_mcp_client_runs_the_model_and_reads_the_run_by_its_id(url):
    mcp = pytest.importorskip("mcp")
    from mcp.client.streamable_http import streamablehttp_client

    async def calls():
        async with streamablehttp_client(f"{url}gradio_api/mcp/") as (read, write, _):
            async with mcp.ClientSession(read, write) as session:
                await session.initialize()
                tools = {tool.name for tool in (await session.list_tools()).tools}
                ran = await session.call_tool("denoise", denoise_kwargs(steps=3))
                run_id = ast.literal_eval(ran.content[-1].text)["run_id"]  # the last output: the data
                scores = await session.call_tool("concepts", {"score": "mass", "run_id": run_id})
                unknown = await session.call_tool("concepts", {"score": "mass", "run_id": "no-such-run"})
                anyones = await session.call_tool("concepts", {"score": "mass"})  # the shared session's latest run
                return tools, run_id, scores, unknown, anyones

    tools, run_id, scores, unknown, anyones = asyncio.run(calls())
    assert anyones.isError and "Give run_id" in anyones.content[0].text
    assert "| no run id over MCP |" in (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text()
    assert {"denoise", "concepts", "attention"} <= tools
    assert not scores.isError and ast.literal_eval(scores.content[-1].text)["steps"] == [1, 2, 3]
    assert unknown.isError and "Unknown run_id" in unknown.content[0].text
    summary = Client(url, verbose=False).predict(*ATTENTION_ARGS, run_id, api_name="/attention")[2]
    assert summary["steps"] == [2]  # the agent's run, for anyone given its id


def test_compare_guidance_runs_the_same_noise_at_each_value_and_draws_their_paths(client):
    updates = list(client.submit("tiny-random", "a cat", "", 1, 3, 64, 64, "uniform", 2.0, "", "1, 7.5",
                                 api_name="/compare_guidance"))
    last = updates[-1]
    data = last[-1]
    assert set(data) == {"1", "7.5"} and data["1"]["steps"] == [1, 2, 3]
    assert last[0] is not None and last[2] is not None and list(last[4:8]) == [None] * 4  # two of four slots used
    assert last[-2] is not None  # the paths
    with pytest.raises(Exception, match="between 2 and 4 guidance values"):
        client.predict("tiny-random", "a cat", "", 1, 3, 64, 64, "uniform", 2.0, "", "5", api_name="/compare_guidance")


def test_compare_schedules_streams_three_runs(client):
    updates = list(client.submit("tiny-random", "a cat", "", 1, 4, 5.0, 64, 64, 2.0, api_name="/compare_schedules"))
    assert 1 <= len(updates) <= 4  # a step that a newer one overtook while rendering is not sent
    shown = [update[-1]["uniform"]["steps"][-1] for update in updates]
    assert shown == sorted(set(shown)) and shown[-1] == 4
    data = updates[-1][-1]
    assert set(data) == {"uniform", "early", "latter"} and data["latter"]["steps"] == [1, 2, 3, 4]
    assert data["early"]["timesteps"] != data["uniform"]["timesteps"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"steps": 0}, "less than minimum value 1"),  # checked by the slider itself
        ({"width": 60}, "multiple of 8"),
        ({"model_id": "evil/model"}, "not in the list of choices"),
        ({"schedule": "custom", "custom": "10, 500"}, "strictly decreasing"),
    ],
)
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(client, changes, message):
    with pytest.raises(Exception, match=message):
        client.predict(*denoise_args(**changes), api_name="/denoise")
    assert client.predict(*denoise_args(steps=2), api_name="/denoise")[DATA]["step"] == 2


def test_api_before_any_run_explains_itself(url):
    fresh = Client(url, verbose=False)
    with pytest.raises(Exception, match="No run yet"):
        fresh.predict(api_name="/concepts")


def test_saliency_explains_a_step_of_the_session_run(url):
    session_client = Client(url, verbose=False)
    list(session_client.submit(*denoise_args(steps=3), api_name="/denoise"))
    overlay, chart, npy, data, _ = session_client.predict(
        "DF-RISE", 2, 16, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, True, api_name="/saliency"
    )
    assert np.load(npy).shape == (8, 8)
    assert data["method"] == "df-rise" and data["step"] == 2 and data["options"]["n_masks"] == 16
    assert 0 <= data["insertion_auc"] <= 1 and len(data["deletion"]) == 9
    _, _, _, cam, _ = session_client.predict(
        "DF-CAM", 3, 16, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, api_name="/saliency"
    )
    assert cam["denoiser_calls"] == 1 and len(cam["layers"]) > 5 and "insertion_auc" not in cam
    options = cam["options"]
    assert (options["rectify"], options["target"], options["weighting"], options["layer_scale"]) == ("relu", "guidance", "layercam", "target")
    assert set(cam["layer_shares"]) == set(cam["layers"]) and sum(cam["layer_shares"].values()) == pytest.approx(1, abs=1e-3)
    _, _, cam_npy, magnitude_cam, _ = session_client.predict(
        "DF-CAM", 3, 16, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "abs", api_name="/saliency"
    )
    assert magnitude_cam["options"]["rectify"] == "abs" and np.load(cam_npy).shape == (8, 8)
    _, _, paper_npy, paper_cam, _ = session_client.predict(
        "DF-CAM", 3, 16, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "relu", "sum",
        api_name="/saliency",
    )
    assert paper_cam["options"]["target"] == "sum" and paper_cam["options"]["rectify"] == "relu"
    assert paper_cam["options"]["weighting"] == "layercam" and not np.allclose(np.load(paper_npy), np.load(cam_npy))
    _, _, hires_npy, hires_cam, _ = session_client.predict(
        "DF-CAM", 3, 16, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "relu", "sum",
        "hirescam", api_name="/saliency",
    )
    assert hires_cam["options"]["weighting"] == "hirescam" and not np.allclose(np.load(hires_npy), np.load(paper_npy))
    _, _, grad_npy, grad_cam, layers = session_client.predict(  # the paper's rules, all four of them
        "DF-CAM", 3, 16, 0.5, "next-latent", "pixel", 0, "sum of all layers", 0.8, False, "contrast", "relu", "sum",
        "grad-cam", "min-max", api_name="/saliency",
    )
    assert (grad_cam["options"]["weighting"], grad_cam["options"]["layer_scale"]) == ("grad-cam", "min-max")
    assert not np.allclose(np.load(grad_npy), np.load(paper_npy))
    shares = grad_cam["layer_shares"]
    choices = [value for _, value in layers["choices"]][1:]  # after "sum of all layers", the layers that carry most first
    assert choices == sorted(shares, key=lambda name: -shares[name])
    assert data["options"]["estimator"] == "contrast"  # left out: the control's default
    _, _, _, paper, _ = session_client.predict(
        "DF-RISE", 2, 16, 0.5, "paper", "pixel", 0, "sum of all layers", 0.8, False, "sum", api_name="/saliency"
    )
    assert paper["options"]["mode"] == "paper" and paper["options"]["estimator"] == "sum"


def test_the_queue_polls_at_the_configured_intervals_not_every_millisecond(monkeypatch):
    """Gradio's queue loops sleep this long between looks while free; at their defaults (1 ms and
    10 ms) an idle server spends 8 % of a core on them, taking the GIL from a run each time."""
    import asyncio

    import app
    from gradio import queueing
    from ui import settings

    queue = app.build_demo()._queue  # a demo of its own: the loops below stop its queue
    slept, here, real_sleep = [], threading.get_ident(), asyncio.sleep

    async def sleep(seconds, *args, **kwargs):
        if threading.get_ident() != here:  # another server's loops (the tests' app) sleep as usual
            return await real_sleep(seconds, *args, **kwargs)
        slept.append(seconds)
        queue.stopped = True

    monkeypatch.setattr(queueing.asyncio, "sleep", sleep)
    for loop in (queue.start_processing, queue.start_progress_updates):
        queue.stopped = False
        asyncio.run(loop())
    assert slept == [settings.APP.queue_poll_s, settings.APP.progress_poll_s]
    assert settings.APP.queue_poll_s >= 0.01 and settings.APP.progress_poll_s >= 0.05


def test_on_zerogpu_the_hub_models_load_at_startup_and_nothing_elsewhere():
    from explainer import config
    from ui.gpu import models_to_preload

    assert models_to_preload(zero_gpu=False) == []
    assert set(models_to_preload(zero_gpu=True)) == {spec.id for spec in config.MODELS.values() if spec.hub and spec.preload} != set()
    assert {"stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-schnell"}.isdisjoint(models_to_preload(zero_gpu=True))


def test_what_crosses_into_and_out_of_a_zerogpu_worker_pickles():
    """ZeroGPU runs each @spaces.GPU call in a forked worker and pickles its arguments, its result
    and every item it yields; an object that does not pickle fails only on the Space."""
    import pickle

    from explainer.run import RunSettings
    from ui import gpu

    settings = RunSettings(prompt="a cat", steps=3, guidance=5.0, width=64, height=64, seed=1, per_group=True).to_dict()
    items = list(gpu.run_on_device("tiny-random", [settings]))
    assert [kind for kind, _, _ in items] == ["start", "step", "step", "step", "end"]
    for item in items:
        pickle.loads(pickle.dumps(item))
    run = items[0][2]
    run.records.extend(item for kind, _, item in items if kind == "step")
    computing = pickle.loads(pickle.dumps(run.for_computing()))
    explanation, scores = pickle.loads(pickle.dumps(gpu.explain_on_device("tiny-random", computing, "df-cam", {}, 2, True)))
    assert explanation.saliency.shape == run.latent_size and 0 <= scores["insertion_auc"] <= 1
    series = pickle.loads(pickle.dumps(gpu.relevance_on_device("tiny-random", computing)))
    assert len(series["steps"]) == 3

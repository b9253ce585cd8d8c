"""Many users at once, cancelled runs, and what the API will serve."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from explainer import capture
from explainer.models import load_model
from test_app import DATA, PRED_A, denoise_args
from ui.settings import APP

JOBS = [(f"a {word} on a red circle", seed) for word, seed in zip(["cat", "dog", "bird", "tree", "car", "sun", "boat", "fish"], range(8))]


def _final(client, prompt, seed):
    last = client.predict(*denoise_args(prompt=prompt, seed=seed, steps=3), api_name="/denoise")
    return last[DATA]["token_scores"], np.asarray(Image.open(last[PRED_A]))


# the fast tier: twice the runs the queue takes at once, so some wait; the full suite: all of JOBS
@pytest.mark.parametrize("count", [2 * APP.max_concurrent_runs, pytest.param(len(JOBS), marks=pytest.mark.slow)])
def test_simultaneous_jobs_equal_the_same_jobs_one_by_one(url, count):
    jobs = JOBS[:count]
    clients = [Client(url, verbose=False) for _ in jobs]
    alone = [_final(clients[0], prompt, seed) for prompt, seed in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _final(job[0], *job[1]), zip(clients, jobs)))
    for (scores_alone, image_alone), (scores_together, image_together) in zip(alone, together):
        assert scores_alone == scores_together
        np.testing.assert_array_equal(image_alone, image_together)
    assert not capture._INSTALLED  # every run gave its processors back


def test_a_cancelled_run_stops_within_a_step_and_the_next_one_works(url):
    unet = load_model("tiny-random").pipe.unet  # the app's own pipeline (same process)
    calls = []
    hook = unet.register_forward_pre_hook(lambda *_: calls.append(time.time()))
    try:
        client = Client(url, verbose=False)
        job = client.submit(*denoise_args(steps=100, width=256, height=256), api_name="/denoise")
        while len(job.outputs()) < 2:
            time.sleep(0.01)
        job.cancel()
        cancelled_at = len(calls)
        deadline = time.time() + 10
        while capture._INSTALLED and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert not capture._INSTALLED, "the cancelled run still holds the attention processors"
        assert len(calls) <= cancelled_at + 2, f"{len(calls) - cancelled_at} more denoiser calls after cancelling"
    finally:
        hook.remove()
    assert client.predict(*denoise_args(steps=2), api_name="/denoise")[DATA]["step"] == 2


@pytest.mark.parametrize("path", ["/etc/passwd", "app.py", "explainer/config.py", "../../etc/hostname"])
def test_the_api_serves_no_file_outside_its_output(url, path):
    response = httpx.get(f"{url}gradio_api/file={path}")
    assert response.status_code in (403, 404)

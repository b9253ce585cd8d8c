"""The launched app, driven through gradio_client as an API user would."""

import socket

import pytest
from gradio_client import Client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    import app

    port = _free_port()
    app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.demo.close()


def denoise_args(prompt="a cat on a red circle", steps=4, **changes):
    args = dict(
        model_id="tiny-random", prompt=prompt, negative="", seed=1, steps=steps, guidance=5.0,
        width=64, height=64, schedule="uniform", lam=60, custom="",
    )
    args.update(changes)
    return list(args.values())


def test_only_named_endpoints_are_public(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/denoise"}


def test_denoise_streams_one_update_per_step(client):
    job = client.submit(*denoise_args(steps=4), api_name="/denoise")
    updates = list(job)
    assert len(updates) == 4
    steps = [update[5]["step"] for update in updates]
    assert steps == [1, 2, 3, 4]
    last = updates[-1]
    assert last[5]["words"] == ["a", "cat", "on", "a", "red", "circle"]
    assert set(last[5]["token_scores"]) == {"0:a", "1:cat", "2:on", "3:a", "4:red", "5:circle"}
    assert last[0].endswith((".webp", ".png")) and "step 4 of 4" in last[2]
    assert len(last[4]) == 6  # one overlay per word


def test_custom_schedule_through_the_api(client):
    updates = list(client.submit(*denoise_args(schedule="custom", custom="999, 500, 100"), api_name="/denoise"))
    assert [u[5]["timestep"] for u in updates] == [999, 500, 100]


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
    assert client.predict(*denoise_args(steps=2), api_name="/denoise")[5]["step"] == 2

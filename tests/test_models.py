import threading
from pathlib import Path

import pytest
import torch

from explainer import config
from explainer.models import LoadedModel, load_model, preferred_device

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_model_is_refused_with_the_allowed_list():
    with pytest.raises(ValueError, match=r"Unknown model 'evil/model'.*stable-diffusion-v1-4"):
        load_model("evil/model")


def test_gpu_models_are_refused_on_a_cpu_with_what_to_do_instead():
    with pytest.raises(ValueError, match=r"needs a GPU, and this machine has none\. To explain a model here, choose "
                                         r"'Shapes world \(embedded, runs on CPU\)'"):
        load_model("CompVis/stable-diffusion-v1-4")


def test_hub_models_are_refused_offline(monkeypatch):
    from explainer import models

    monkeypatch.setattr(models, "preferred_device", lambda: (torch.device("cuda"), torch.float16))  # a GPU machine
    with pytest.raises(ValueError, match=r"Hugging Face Hub, which is switched off here \(HF_HUB_OFFLINE=1\)"):
        load_model("CompVis/stable-diffusion-v1-4")


def test_weights_that_fail_to_load_are_refused_with_the_reason(monkeypatch):
    """Offline without HF_HUB_OFFLINE, or weights missing from the cache: the loader's own error, said plainly."""
    from explainer import models

    monkeypatch.setattr(models, "preferred_device", lambda: (torch.device("cuda"), torch.float16))
    monkeypatch.setattr(config, "HUB_OFFLINE", False)

    def unreachable(spec):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models, "_build_pipeline", unreachable)
    with pytest.raises(ValueError, match=r"could not be loaded here \(OSError: We couldn't connect.*use Stable Diffusion v1\.5"):
        load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_config_allows_the_paper_models_and_the_embedded_one():
    assert {"CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5"} <= set(config.MODELS)
    embedded = config.MODELS[config.EMBEDDED_MODEL_ID]
    assert not embedded.hub and Path(embedded.source).parent == config.ASSETS_DIR


def test_one_pipeline_per_id_per_process():
    first = load_model(config.TINY_RANDOM_MODEL_ID)
    assert isinstance(first, LoadedModel)
    assert load_model(config.TINY_RANDOM_MODEL_ID) is first
    device, dtype = preferred_device()
    assert first.device.type == device.type and first.dtype == dtype


def test_default_model_is_the_embedded_one_when_its_weights_exist():
    has_weights = (Path(config.MODELS[config.EMBEDDED_MODEL_ID].source) / "model_index.json").is_file()
    expected = config.EMBEDDED_MODEL_ID if has_weights else config.TINY_RANDOM_MODEL_ID
    assert config.default_model_id() == expected


def test_no_code_trusts_remote_code():
    sources = list((ROOT / "explainer").rglob("*.py")) + list((ROOT / "ui").rglob("*.py")) + [ROOT / "app.py"]
    offenders = [str(path) for path in sources if path.exists() and "trust_remote_code=True" in path.read_text()]
    assert offenders == []


def test_fitted_preview_map_tracks_the_vae(tiny_model):
    assert tiny_model.latent_rgb.shape == (5, 3)  # 4 latent channels + bias


def test_randomised_model_reinitialises_only_the_unet(tiny_model):
    # seed 1: the tiny pipeline itself was built from configs under seed 0
    first, second = tiny_model.randomised(seed=1), tiny_model.randomised(seed=1)
    assert first.id == "tiny-random-randomised" and first.pipe.text_encoder is tiny_model.pipe.text_encoder
    weights = lambda m: torch.cat([p.flatten() for p in m.pipe.unet.parameters()])  # noqa: E731
    assert not torch.equal(weights(first), weights(tiny_model))
    assert torch.equal(weights(first), weights(second))  # seeded


def test_prompts_encoded_in_many_threads_equal_the_same_prompts_alone(tiny_model):
    # A fast tokenizer's padding state is shared: without the model's tokenizer lock, about one
    # call in forty came back unpadded here (8 tokens instead of 77) under two threads.
    prompts = ["a cat", "a red dog on a circle", "a big blue square at the top and a tree"]
    alone = {p: (tiny_model.encode(p, "", guided=True).tensors["encoder_hidden_states"], tiny_model.tokenize(p)) for p in prompts}
    mismatches = []

    def encode_repeatedly(prompt):
        embeddings, tokens = alone[prompt]
        for _ in range(60):
            if tiny_model.tokenize(prompt) != tokens or not torch.equal(tiny_model.encode(prompt, "", True).tensors["encoder_hidden_states"], embeddings):
                mismatches.append(prompt)

    threads = [threading.Thread(target=encode_repeatedly, args=(p,)) for p in prompts * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []
    assert all(embeddings.shape[1] == tiny_model.pipe.tokenizer.model_max_length for embeddings, _ in alone.values())


def test_a_cpu_server_shares_the_cores_among_its_concurrent_runs(monkeypatch):
    import os

    from explainer.models import share_cpu_cores

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        assert share_cpu_cores(2) == 4 and torch.get_num_threads() == 4
        assert share_cpu_cores(16) == 1 and torch.get_num_threads() == 1  # never fewer than one
    finally:
        torch.set_num_threads(before)


def test_preload_loads_what_it_can_and_says_why_not_for_the_rest():
    from explainer import config
    from explainer.models import load_model, preload

    failures = preload([config.TINY_RANDOM_MODEL_ID, "no/such-model", "CompVis/stable-diffusion-v1-4"])
    assert set(failures) == {"no/such-model", "CompVis/stable-diffusion-v1-4"}
    assert "needs a GPU" in failures["CompVis/stable-diffusion-v1-4"]  # a CPU here: never reaches the Hub
    assert load_model(config.TINY_RANDOM_MODEL_ID) is load_model(config.TINY_RANDOM_MODEL_ID)  # loaded once, kept

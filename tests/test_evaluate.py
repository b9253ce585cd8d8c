import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from explainer.evaluate.protocol import DEFAULT_METHODS, PHASES_ONLY, REFERENCE, Protocol, make_map, phases
from explainer.evaluate.tables import mean_interval
from explainer.metrics import iou, pointing_game
from explainer.shapes.truth import shape_grid

# a UNet on the shapes world (localised against the drawn shape) and a tiny MM-DiT (ConceptAttention)
SMALL = ["--model", "embedded/shapes-ldm", "tiny-sd3", "--num-prompts", "2", "--steps", "6", "--step", "5", "--masks", "8",
         "--lime-samples", "16", "--batch-size", "16"]


def test_pointing_game_and_iou_known_answers():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    perfect = mask.astype(np.float32)
    assert pointing_game(perfect, mask) == 1.0 and iou(perfect, mask) == 1.0
    inverted = 1 - perfect
    assert iou(inverted, mask) == 0.0
    far = np.zeros((8, 8), np.float32)
    far[7, 7] = 1
    assert pointing_game(far, mask) == 0.0
    assert iou(np.ones((8, 8), np.float32), mask) == 0.0  # a constant map selects nothing


def test_mean_interval():
    result = mean_interval([1.0, 2.0, 3.0, float("nan")])
    assert result["mean"] == 2.0 and result["n"] == 3 and result["low"] < 2.0 < result["high"]
    skewed = mean_interval([0.0, 0.0, 0.0, 0.9], bounds=(0.0, 1.0))  # an IoU: the interval stays in its range
    assert skewed["low"] == 0.0 and 0.225 < skewed["high"] < 1.0


def _run(args, out, processes=1):
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "explainer.evaluate"]
    else:
        with socket.socket() as sock:  # a free rendezvous port, not the shared default 29500
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
                   "-m", "explainer.evaluate"]
    subprocess.run(command + args + ["--out", str(out)], check=True, env=env, capture_output=True, timeout=900)
    return {folder.name: json.loads((folder / "results.json").read_text()) for folder in out.iterdir() if folder.is_dir()}


@pytest.mark.slow
def test_one_command_writes_both_families_side_by_side_and_two_processes_give_the_same(tmp_path):
    single = _run(SMALL, tmp_path / "one")
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"shapes-ldm", "tiny-sd3", "comparison.md", "timesteps.png"}
    assert {p.name for p in (tmp_path / "one" / "tiny-sd3").iterdir()} == {"results.json", "results.csv", "curves.png"}
    unet, mmdit = single["shapes-ldm"]["summary"], single["tiny-sd3"]["summary"]
    assert set(mmdit["methods"]) == set(DEFAULT_METHODS) and mmdit["reference"] is None  # no drawn shape off the shapes world
    assert set(unet["methods"]) == set(DEFAULT_METHODS) - {"concept-attention"} | {REFERENCE}  # ConceptAttention: MM-DiT only
    for entry, side in [*((e, 16) for e in unet["methods"].values()), *((e, 8) for e in mmdit["methods"].values())]:
        assert 0 <= entry["insertion_auc"]["mean"] <= 1 and len(entry["deletion_mean_curve"]) == side + 1  # a point per row
        assert 0 <= entry["other_distances"]["mse"]["deletion_auc"]["mean"] <= 1  # both distances from one pass
        assert 0 <= entry["other_fills"]["inpaint"]["insertion_auc"]["mean"] <= 1  # the model's own fill beside the blur
    csv_rows = (tmp_path / "one" / "tiny-sd3" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * len(DEFAULT_METHODS)
    per_step = unet["localisation"]["steps"]  # every step, the slow methods at the three phases only
    scored = {name: [k + 1 for k, value in enumerate(scores["iou"]) if value["mean"] is not None] for name, scores in per_step.items()}
    assert scored["df-cam"] == scored["cross-attention"] == list(range(1, 7))
    assert scored["df-rise"] == scored["df-lime"] == sorted(set(phases(6).values())) and "df-lime" in PHASES_ONLY
    comparison = (tmp_path / "one" / "comparison.md").read_text()
    assert "| shapes-ldm (UNet) insertion ↓ |" in comparison and "tiny-sd3 (MM-DiT) insertion ↓" in comparison
    assert "| ConceptAttention (output space) | — | — | — |" in comparison  # no row of numbers for the UNet
    assert "filled by **inpaint** against **blur**" in comparison and "Kendall's tau (1: unchanged): shapes-ldm (UNet)" in comparison
    split = _run(SMALL, tmp_path / "two", processes=2)
    assert split == single  # prompts split across processes, gathered into the identical tables


def test_shape_mask_reference_is_the_drawn_shape(embedded_model):
    from explainer.run import InstrumentedRun, RunSettings

    settings = RunSettings(prompt="a big red circle in the center", seed=3, steps=8, width=64, height=64)
    run = InstrumentedRun(embedded_model, settings).run_all().data
    shape = shape_grid(run)
    assert 0 < shape.sum() < shape.size
    reference = make_map(REFERENCE, Protocol(model=embedded_model.id), embedded_model, run, 8)
    assert np.array_equal(reference > 0.5, shape)  # the shape first, then the rest centre-first


def test_a_stopped_evaluation_resumes_from_the_prompts_it_finished(tmp_path, monkeypatch):
    """Each finished prompt is kept as it finishes; --resume keeps those of the same settings and runs the rest."""
    import explainer.evaluate.__main__ as command

    args = ["--model", "tiny-random", "--num-prompts", "2", "--steps", "3", "--step", "2", "--methods", "random", "centre",
            "--fills", "blur", "--batch-size", "8", "--out", str(tmp_path)]
    first = command.main(args)["tiny-random"]
    assert not list(tmp_path.glob("*/rows.partial.*"))  # a finished run leaves no partial rows
    rows = json.loads((tmp_path / "tiny-random" / "results.json").read_text())["prompts"]
    partial = tmp_path / "tiny-random" / "rows.partial.0.jsonl"
    key = command.protocol_key(command.Protocol(model="tiny-random", steps=3, step=2, guidance=5.0, batch_size=8,
                                                methods=("random", "centre"), fills=("blur",)))
    partial.write_text(json.dumps({"protocol": key, "row": rows[0]}) + "\n" + '{"protocol": "cut sh')  # stopped mid-line
    evaluated = []
    real = command.evaluate_prompt
    monkeypatch.setattr(command, "evaluate_prompt", lambda *a: evaluated.append(a[2]) or real(*a))
    again = command.main(args + ["--resume"])["tiny-random"]
    assert evaluated == [1]  # the first prompt was kept, the second run again
    assert again["methods"]["random"]["insertion_auc"] == first["methods"]["random"]["insertion_auc"]
    command.main(args)  # without --resume every prompt runs again
    assert evaluated == [1, 0, 1]

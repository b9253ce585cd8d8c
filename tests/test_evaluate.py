import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from explainer.evaluate.protocol import MAP_METHODS, REFERENCE, Protocol, make_map
from explainer.evaluate.tables import mean_interval
from explainer.metrics import iou, pointing_game
from explainer.shapes.truth import shape_grid

SMALL = ["--model", "tiny-random", "--num-prompts", "3", "--steps", "4", "--step", "3", "--masks", "8", "--lime-samples", "16", "--batch-size", "16"]


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
    subprocess.run(command + args + ["--out", str(out)], check=True, env=env, capture_output=True, timeout=600)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_one_command_writes_the_tables_and_two_processes_give_the_same(tmp_path):
    single = _run(SMALL, tmp_path / "one")
    assert {p.name for p in (tmp_path / "one").iterdir()} == {"results.json", "results.csv", "curves.png"}
    summary = single["summary"]
    assert summary["prompts"] == 3 and set(summary["methods"]) == set(MAP_METHODS)
    assert summary["reference"] is None  # the drawn-shape reference exists on the shapes world only
    for entry in summary["methods"].values():
        assert 0 <= entry["insertion_auc"]["mean"] <= 1 and len(entry["deletion_mean_curve"]) == 8 + 1
        assert 0 <= entry["other_distances"]["mse"]["deletion_auc"]["mean"] <= 1  # both distances from one pass
    csv_rows = (tmp_path / "one" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * len(MAP_METHODS)
    split = _run(SMALL, tmp_path / "two", processes=2)
    assert split == single  # prompts split across processes, gathered into the identical table


def test_shape_mask_reference_is_the_drawn_shape(embedded_model):
    from explainer.run import InstrumentedRun, RunSettings

    settings = RunSettings(prompt="a big red circle in the center", seed=3, steps=8, width=64, height=64)
    run = InstrumentedRun(embedded_model, settings).run_all().data
    shape = shape_grid(run)
    assert 0 < shape.sum() < shape.size
    reference = make_map(REFERENCE, Protocol(model=embedded_model.id), embedded_model, run, 8)
    assert np.array_equal(reference > 0.5, shape)  # the shape first, then the rest centre-first

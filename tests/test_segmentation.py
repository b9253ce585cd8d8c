"""The zero-shot segmentation benchmark: its rendered sets, the published protocol on a folder the test makes,
and its tables (the metrics' known answers are in test_metrics.py)."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from explainer import config
from explainer.evaluate import segmentation
from explainer.shapes.world import COLOURS, SHAPES, generate_scene, render_scene


def test_the_rendered_sets_have_every_concepts_exact_mask():
    cases = segmentation.shapes_cases(per_set=3)
    assert [c.set for c in cases].count("confusion") == 3 and {c.set for c in cases} == set(segmentation.SETS)
    for case in cases:
        for word, mask in case.concepts.items():
            assert word in case.prompt.replace(",", " ").split() and 0 < mask.sum() < mask.size, (case.name, word)
    same_kind, one_colour, touching = [c for c in cases if c.set == "confusion"]
    assert set(same_kind.concepts) <= set(COLOURS) and len(same_kind.concepts) == 2  # one kind, told apart by colour
    assert set(one_colour.concepts) <= set(SHAPES) and len(one_colour.concepts) == 2
    first, second = touching.concepts.values()
    assert not (first & second).any() and (binary_dilation(first) & second).any()  # they touch, never overlap


def test_a_later_shape_is_cut_from_the_mask_of_one_it_covers():
    scene = render_scene([("red", "square", "big", "center"), ("blue", "circle", "small", "center")], seed=3)
    square, circle = (item.mask for item in scene.shapes)
    assert not (square & circle).any() and circle.sum() > 0
    assert (np.asarray(scene.image)[circle] != np.asarray(scene.image)[square][0]).any()


def write_folder(tmp_path):
    """A fixture set laid out as a published one: images, class-index masks (0 background, 255 void) and names."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    names = ["background", *SHAPES]
    for seed in range(2):
        scene = generate_scene(seed, split="any", n_shapes=1)
        labels = np.zeros((64, 64), np.uint8)
        labels[scene.shapes[0].mask] = names.index(scene.shapes[0].shape)
        labels[:2] = 255  # a void border row, left out of the scores
        Image.fromarray(scene.image).resize((96, 96)).save(images / f"scene{seed}.jpg")
        Image.fromarray(labels).resize((96, 96), Image.Resampling.NEAREST).save(masks / f"scene{seed}.png")
    (tmp_path / "classes.txt").write_text("\n".join(names))
    return images, masks, tmp_path / "classes.txt"


def test_the_published_protocol_runs_on_a_folder_of_images_with_masks(tmp_path):
    images, masks, classes = write_folder(tmp_path)
    cases = segmentation.folder_cases(images, masks, classes)
    assert [case.prompt for case in cases] == [f"a {generate_scene(s, split='any', n_shapes=1).shapes[0].shape}" for s in range(2)]
    assert all(not case.valid[0].any() and case.valid[-1].all() for case in cases)
    results = segmentation.main(["--model", config.TINY_RANDOM_MODEL_ID, "--images", str(images), "--masks-dir", str(masks),
                                 "--classes", str(classes), "--steps", "2", "--methods", "attention", "centre", "random",
                                 "--out", str(tmp_path / "out")])
    summary = results[config.TINY_RANDOM_MODEL_ID]["summary"]["folder"]
    assert summary["pictures"] == 2 and set(summary["methods"]) == {"attention", "centre", "random"}
    for scores in summary["methods"].values():
        assert all(0 <= scores["late"][m]["mean"] <= 1 for m in segmentation.MEASURES)
        assert set(scores["miou_by_step"]) == {1, 2}
    table = (tmp_path / "out" / "table.md").read_text()
    assert "**folder** (2 pictures, 2 concepts)" in table and "other data sets" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["steps"] == 2
    assert (tmp_path / "out" / "timesteps.png").is_file()
    (tmp_path / "out" / "table.md").unlink()
    again = segmentation.main(["--rewrite", "--out", str(tmp_path / "out")])  # from results.json, nothing run
    assert again[config.TINY_RANDOM_MODEL_ID]["summary"]["folder"] == summary
    assert (tmp_path / "out" / "table.md").read_text() == table


def test_a_mask_without_its_image_or_with_an_unknown_class_is_refused(tmp_path):
    images, masks, classes = write_folder(tmp_path)
    classes.write_text("background\ncircle")
    with pytest.raises(ValueError, match="names 2 classes"):
        segmentation.folder_cases(images, masks, classes)
    (masks / "scene0.png").unlink()
    with pytest.raises(ValueError, match="No mask for scene0.jpg"):
        segmentation.folder_cases(images, masks, classes)


@pytest.mark.slow
def test_on_the_embedded_model_the_words_map_beats_the_baselines_on_one_object(tmp_path):
    if config.weights_missing(config.MODELS[config.EMBEDDED_MODEL_ID]):
        pytest.skip("no embedded model")
    results = segmentation.main(["--model", config.EMBEDDED_MODEL_ID, "--per-set", "3", "--steps", "4", "--methods",
                                 "attention", "random", "centre", "--out", str(tmp_path)])
    methods = results[config.EMBEDDED_MODEL_ID]["summary"]["one object"]["methods"]
    late = {name: scores["late"]["miou"]["mean"] for name, scores in methods.items()}
    assert late["attention"] > max(late["random"], late["centre"]), late

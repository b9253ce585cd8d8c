import json
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib import font_manager
from PIL import Image

from explainer import config, export
from explainer.render import charts, pictures, views
from explainer.models import LoadedModel
from explainer.run import InstrumentedRun, RunSettings, stream_runs
from ui.session import Session


@pytest.fixture(scope="module")
def run(tiny_model):
    settings = RunSettings(prompt="a cat and a dog", steps=4, guidance=5.0, width=64, height=64, per_group=True)
    return InstrumentedRun(tiny_model, settings).run_all().data


def test_overlay_follows_the_papers_mix():
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    saliency = np.zeros((4, 4), np.float32)
    saliency[0, 0] = 1.0
    mixed = np.asarray(pictures.overlay(image, saliency), dtype=np.float32) / 255
    jet_top = np.asarray(pictures._JET(1.0)[:3])
    # m = 1: all heat map; m = 0: the image untouched
    np.testing.assert_allclose(mixed[0, 0], jet_top, atol=1 / 255)
    assert mixed[3, 3].max() == 0


def test_word_map_sums_a_words_pieces(run):
    word = run.tokens.find("and")
    positions = list(run.tokens.words[word].positions)
    assert len(positions) == 3
    record = run.records[1]
    expected = record.attention[positions].astype(np.float32).sum(0)
    np.testing.assert_allclose(views.word_map(run, word, [record]), expected, rtol=1e-6)


def test_word_map_over_all_steps_is_the_mean_of_steps(run):
    per_step = [views.word_map(run, 1, [r]) for r in run.records]
    np.testing.assert_allclose(views.word_map(run, 1), np.mean(per_step, axis=0), rtol=1e-5)


def test_special_tokens_come_behind_a_toggle(run):
    assert views.token_labels(run) == ["a", "cat", "and", "a", "dog"]
    labels = views.token_labels(run, include_special=True)
    assert labels[0] == views.START and labels[-2:] == [views.END, views.PADDING]
    total = sum(views.word_map(run, i, [run.records[0]], include_special=True) for i in range(len(labels)))
    np.testing.assert_allclose(total, 1.0, atol=2e-3)  # all rows together: attention sums to one


def test_layer_choice_averages_those_layers(run):
    groups = views.layer_groups(run)
    assert all(label.split()[0] in {"down", "mid", "up"} for label in groups)
    record = run.records[0]
    first, last = next(iter(groups)), next(reversed(groups))
    chosen = views.word_map(run, 1, [record], groups=[first])
    assert chosen.shape == run.latent_size
    assert not np.allclose(chosen, views.word_map(run, 1, [record], groups=[last]))
    # every group together, each weighing its layer count, is the all-layer map (no group is pooled here)
    np.testing.assert_allclose(views.word_map(run, 1, [record], groups=list(groups)), views.word_map(run, 1, [record]), atol=2e-3)
    with pytest.raises(ValueError, match="Unknown layer groups"):
        views.word_map(run, 1, [record], groups=["sideways 3×3"])


def test_concept_series_has_one_line_per_word(run):
    for score in ("peak", "mass"):
        series = views.concept_series(run, score)
        assert list(series) == ["0:a", "1:cat", "2:and", "3:a", "4:dog"]
        assert all(len(values) == 4 for values in series.values())
        for step in range(4):
            column = [values[step] for values in series.values()]
            assert max(column) == 1.0
            assert min(column) == 0.0 if score == "mass" else min(column) > 0  # mass: min-max; peaks: relative to the top


def test_export_zip_reproduces_the_run(run, tmp_path, tiny_model):
    archive = export.export_zip(run, tmp_path / "run.zip")
    with zipfile.ZipFile(archive) as opened:
        names = set(opened.namelist())
        saved = json.loads(opened.read("run.json"))
        maps = np.load(__import__("io").BytesIO(opened.read("step_002/attention.npy")))
    assert {"final.png", "step_001/prediction.png", "step_004/noisy.png", "step_003/attention_01_cat.png"} <= names
    np.testing.assert_array_equal(maps, run.records[1].attention)
    again = InstrumentedRun(tiny_model, RunSettings.from_dict(saved["reproduction"]["settings"])).run_all().data
    np.testing.assert_array_equal(again.final_array, run.final_array)


def _refuse_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_export_is_strict_json_without_server_paths(embedded_model, tmp_path):
    """run.json parses with a parser that refuses NaN and ±Infinity, names no folder of this server,
    and the non-finite scheduler settings read back with float()."""
    run = InstrumentedRun(embedded_model, RunSettings(prompt="a red circle on the left", width=64, height=64, steps=3,
                                                      guidance=5.0)).run_all().data
    with zipfile.ZipFile(export.export_zip(run, tmp_path / "run.zip")) as opened:
        text = opened.read("run.json").decode()
    saved = json.loads(text, parse_constant=_refuse_constant)
    for folder in {str(config.REPO_ROOT), str(Path.home()), tempfile.gettempdir()}:
        assert folder not in text
    assert saved["reproduction"]["model_source"] == "assets/shapes-ldm"
    clipped = saved["reproduction"]["scheduler"]["config"]["lambda_min_clipped"]
    assert float(clipped) == run.reproduction["scheduler"]["config"]["lambda_min_clipped"]


def test_export_names_say_what_the_run_is(run):
    assert export.file_stem(run) == f"a-cat-and-a-dog-seed{run.settings.seed}"
    assert export.strict_json({"x": np.float32(0.5), "n": np.int64(3)}) == '{\n  "x": 0.5,\n  "n": 3\n}'


def test_animation_has_a_frame_per_step_and_the_final_image(run, tmp_path):
    gif = Image.open(export.animation(run, tmp_path / "run.gif", frame_ms=200))
    durations = []
    for index in range(gif.n_frames):  # Pillow merges identical neighbours, adding their durations
        gif.seek(index)
        durations.append(gif.info["duration"])
    assert sum(durations) == 200 * len(run.records) + 200 * 8  # every step, then the final image held
    assert gif.n_frames >= len(run.records)


def test_session_keeps_a_bounded_number_of_runs(run):
    session = Session(limit=2)
    for _ in range(3):
        session.add([run])
    assert len(session.groups) == 2 and session.run(0) is run
    with pytest.raises(ValueError, match="no second prompt"):
        session.run(1)
    path = session.file("x.txt")
    path.write_text("x")
    session.close()
    assert not path.exists()


def test_stream_runs_interleaves_steps(tiny_model):
    settings = [RunSettings(prompt=p, steps=3, width=64, height=64, guidance=5.0) for p in ("a cat", "a dog")]
    events = [(kind, index) for kind, index, _ in stream_runs(tiny_model, settings)]
    assert events == [("start", 0), ("start", 1)] + [("step", i) for _ in range(3) for i in (0, 1)] + [("end", 0), ("end", 1)]


def test_closed_vocabulary_names_unknown_words(tiny_model):
    spec = config.MODELS[config.EMBEDDED_MODEL_ID]
    closed = LoadedModel(id="shapes", pipe=tiny_model.pipe, latent_rgb=tiny_model.latent_rgb, spec=spec)
    closed.check_prompt("a red circle")  # the tiny tokenizer has these as whole words
    with pytest.raises(ValueError, match=r"Words not in the shapes model's vocabulary: 'playing', 'soccer', 'zebra'. It knows: cat, circle, dog, red"):
        closed.check_prompt("a zebra playing soccer")


def test_noise_chart_marks_the_step_on_a_cached_drawing(run):
    chart = charts.noise_level_chart(tuple(run.timesteps), tuple(run.noise_levels))
    assert charts.noise_level_chart(tuple(run.timesteps), tuple(run.noise_levels)) is chart  # drawn once
    first, last = np.asarray(chart.at(1).convert("RGB")), np.asarray(chart.at(4).convert("RGB"))
    x, y = (int(round(v)) for v in chart.pixels[0])
    assert tuple(first[y, x]) == (209, 73, 91) and tuple(last[y, x]) != (209, 73, 91)
    assert chart.pixels[0][1] < chart.pixels[-1][1]  # noise falls: the first point is higher on the picture


def test_streaming_concept_chart_paints_each_word_where_its_scores_are():
    chart = charts.streaming_concept_chart(10, ("red", "circle"), "title", "score")
    assert charts.streaming_concept_chart(10, ("red", "circle"), "title", "score") is chart  # drawn once per run shape
    picture = np.asarray(chart.draw({"red": [1.0, 1.0, 1.0], "circle": [0.0, 0.0]}).convert("RGB"))
    assert picture.shape[:2] == np.asarray(chart.base).shape
    for word, value, step in (("red", 1.0, 3), ("circle", 0.0, 2)):
        x, y = chart.to_pixels([(step, value)])[0]
        colour = chart.colours[chart.words.index(word)]
        assert tuple(picture[int(round(chart.height - y)), int(round(x))]) == colour
    x, y = chart.to_pixels([(5, 1.0)])[0]  # nothing beyond the steps so far
    assert tuple(picture[int(round(chart.height - y)), int(round(x))]) != chart.colours[0]


def test_word_overlays_at_most_max_side_show_the_same_overlay_smaller(run):
    record = run.records[-1]
    full = views.word_overlays(run, record)
    small = views.word_overlays(run, record, max_side=64)
    assert [label for _, label in small] == [label for _, label in full]
    assert full[0][0].size == (128, 128) and all(picture.size == (64, 64) for picture, _ in small)
    for (big, _), (little, _) in zip(full, small):
        shrunk = np.asarray(big.resize(little.size, Image.Resampling.BILINEAR), dtype=float)
        assert np.abs(shrunk - np.asarray(little, dtype=float)).mean() < 4  # of 255


def test_streamed_charts_are_palette_pictures_of_the_matplotlib_drawing():
    """Palette pictures encode 3-5x faster as PNG; the palette keeps a chart's drawing (antialiased
    text is the only place with more colours than it holds)."""
    import io

    chart = charts.streaming_concept_chart(10, ("red", "circle"), "title", "score")
    assert chart.base.mode == "P" and chart.draw({"red": [0.5] * 10}).mode == "P"
    assert charts.noise_level_chart((999, 500, 1), (14.6, 1.0, 0.03)).at(2).mode == "P"
    drawn = charts.concept_chart(list(range(1, 11)), {"red": list(np.linspace(0, 1, 10)), "circle": [0.5] * 10}, "title", "score")
    palette = charts.as_palette(drawn)
    error = np.abs(np.asarray(palette.convert("RGB")).astype(int) - np.asarray(drawn).astype(int)).max(axis=-1)
    assert (error == 0).mean() > 0.99 and error.max() <= 24
    sizes = []
    for picture in (palette, drawn):
        buffer = io.BytesIO()
        picture.save(buffer, format="png")
        sizes.append(buffer.tell())
    assert sizes[0] < sizes[1] / 2


def test_charts_drawn_in_many_threads_at_once_equal_the_same_charts_drawn_alone():
    """The server draws charts in its handler threads; no figure may leak into another."""
    import threading

    import matplotlib.pyplot as plt

    series = {word: list(np.linspace(0, 1, 12) ** (i + 1)) for i, word in enumerate(("a", "red", "circle"))}
    kinds = {
        "concepts": lambda: charts.concept_chart(list(range(1, 13)), series, "title", "score"),
        "bars": lambda: charts.token_bars({word: sum(values) for word, values in series.items()}, "totals"),
        "curves": lambda: charts.insertion_deletion_chart(
            {"insertion": [1, 0.5, 0.2], "deletion": [0, 0.4, 0.9], "insertion_auc": 0.5, "deletion_auc": 0.4, "distance": "mse"}),
    }
    alone = {name: np.asarray(draw()) for name, draw in kinds.items()}
    drawn, barrier = [], threading.Barrier(6)

    def draw_all():
        barrier.wait()
        for _ in range(2):
            drawn.extend((name, np.asarray(draw())) for name, draw in kinds.items())

    threads = [threading.Thread(target=draw_all) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(drawn) == 6 * 2 * len(kinds)
    assert all(np.array_equal(picture, alone[name]) for name, picture in drawn)
    assert plt.get_fignums() == []  # nothing was left in pyplot's global registry


@pytest.mark.skipif(not any(Path(p).name in charts.FALLBACK_FONT_FILES for p in font_manager.findSystemFonts()),
                    reason="needs the fonts of packages.txt: apt-get install fonts-droid-fallback fonts-nanum "
                           "(bash .ci/run installs them)")
def test_charts_draw_words_in_other_scripts():
    """Prompts in Chinese, Japanese or Korean: the legend shows the words, not boxes."""
    words = {"0:猫": [0.0, 1.0], "1:고양이": [1.0, 0.0], "2:ねこ": [0.2, 0.3], "3:dog": [0.5, 0.5]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        charts.concept_chart([1, 2], words, "title", "score")
        charts.StreamingConceptChart(2, tuple(words), "title", "score").draw(words)
        charts.token_bars({word: sum(values) for word, values in words.items()}, "title")
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_methods_and_metrics_import_no_drawing_and_charts_change_no_global_setting():
    """The methods and metrics run without the rendering package or matplotlib; importing and
    drawing the charts leaves matplotlib's global settings as they were."""
    import subprocess
    import sys

    probe = (
        "import sys, matplotlib; before = dict(matplotlib.rcParams); del sys.modules['matplotlib']\n"
        "for name in [m for m in sys.modules if m.startswith('matplotlib')]: del sys.modules[name]\n"
        "import explainer.methods, explainer.metrics, explainer.replay, explainer.run\n"
        "drawing = sorted(m for m in sys.modules if m.startswith(('matplotlib', 'explainer.render')))\n"
        "from explainer.render import charts\n"
        "charts.concept_chart([1, 2], {'0:a': [0.0, 1.0]}, 'title', 'score'); charts.token_bars({'0:a': 1.0}, 'title')\n"
        "import matplotlib\n"
        "print(drawing, dict(matplotlib.rcParams) == before)\n"
    )
    printed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert printed.strip().splitlines()[-1] == "[] True"


def test_word_overlays_on_one_shared_scale_keep_a_weak_word_weak_and_say_each_words_peak(run):
    record = run.records[-1]
    maps = [views.word_map(run, i, [record]) for i in range(len(views.token_labels(run)))]
    peaks = [float(values.max()) for values in maps]
    weakest = int(np.argmin(peaks))
    shared = views.word_overlays(run, record, shared_scale=True)
    own = views.word_overlays(run, record, shared_scale=False)
    assert [label for _, label in shared] == [f"{word} · peak {peak:.0%}" for word, peak in zip(views.token_labels(run), peaks)]
    # the weakest word drawn on the shared scale is closer to the picture (less heat) than on its own
    picture = np.asarray(pictures.for_display(pictures.step_picture(record, "prediction"), min_side=128), dtype=float)
    heat = [np.abs(np.asarray(overlays[weakest][0], dtype=float) - picture).mean() for overlays in (shared, own)]
    assert heat[0] < heat[1]
    strongest = int(np.argmax(peaks))  # the strongest word reaches the top of the scale either way
    np.testing.assert_array_equal(np.asarray(shared[strongest][0]), np.asarray(own[strongest][0]))


def test_an_overlay_on_a_given_scale_clips_at_its_top_and_starts_at_zero():
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    saliency = np.array([[0.0, 4.0]], np.float32)
    on_scale = np.asarray(pictures.overlay(image, saliency, scale=2.0))
    np.testing.assert_array_equal(on_scale[0, 0], [0, 0, 0])  # 0 is the bottom: no heat
    np.testing.assert_array_equal(on_scale[0, 1], np.asarray(pictures.overlay(image, np.array([[0.0, 1.0]]), scale=1.0))[0, 1])


def test_the_colour_bar_has_its_tick_labels_and_caption_in_readable_text():
    bar = charts.colour_bar("a caption", ("least", "", "most"))
    assert bar.size[0] >= 400 and 60 <= bar.size[1] <= 120
    pixels = np.asarray(bar.convert("L"))
    text_rows = (pixels < 100).sum(1) > 0  # dark text under the bar: the tick labels, then the caption
    assert text_rows[bar.size[1] // 2:].sum() >= 20  # 11 px text, two lines
    assert charts.colour_bar("a caption", ("least", "", "most")) is bar  # drawn once


def test_latent_paths_put_runs_from_one_noise_on_one_plane_starting_together(tiny_model):
    runs = [InstrumentedRun(tiny_model, RunSettings(prompt="a cat", steps=4, guidance=g, width=64, height=64, seed=3)).run_all().data
            for g in (1.0, 9.0)]
    paths, variance = views.latent_paths(runs)
    assert [path.shape for path in paths] == [(5, 2), (5, 2)]  # the noise, then after each step
    np.testing.assert_allclose(paths[0][0], paths[1][0], atol=1e-4)  # the same starting noise
    assert np.abs(paths[0][-1] - paths[1][-1]).max() > 1e-3  # guidance took them apart
    assert 0 < variance[1] <= variance[0] <= 1
    assert charts.trajectory_chart({"a": paths[0], "b": paths[1]}, variance, "title").size[0] > 300

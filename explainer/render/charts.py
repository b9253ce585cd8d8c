"""Charts of what was computed: the noise level, the concept charts, token bars and the
insertion and deletion curves (matplotlib, outside pyplot)."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

# Fonts for the glyphs DejaVu Sans lacks: prompts in Chinese, Japanese or Korean would otherwise
# show as boxes in the charts' legends. The Space installs them (packages.txt), as does CI.
FALLBACK_FONT_FILES = ("DroidSansFallbackFull.ttf", "NanumGothic.ttf")  # Chinese and Japanese; Korean


def _fallback_font_families() -> list[str]:
    """Families of the fallback fonts on this system, registered with matplotlib even when its font
    cache was built before they were installed (matplotlib does not rescan on its own)."""
    manager = font_manager.fontManager
    known = {Path(entry.fname).name for entry in manager.ttflist}
    for path in font_manager.findSystemFonts():
        if Path(path).name in FALLBACK_FONT_FILES and Path(path).name not in known:
            manager.addfont(path)
            known.add(Path(path).name)
    return list(dict.fromkeys(entry.name for entry in manager.ttflist if Path(entry.fname).name in FALLBACK_FONT_FILES))


@functools.cache
def _word_families() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*matplotlib.rcParams["font.family"], *_fallback_font_families()]))


def word_font(size: float) -> font_manager.FontProperties:
    """The font of text that shows the prompt's words (legends, bar labels): matplotlib's default
    family, then the fallbacks for the scripts it lacks, glyph by glyph. Given per text, so that
    importing or drawing never changes matplotlib's global settings."""
    return font_manager.FontProperties(family=list(_word_families()), size=size)


# Text sizes (points; at 100 dpi a point is 1.39 px): the charts are shown at 0.8x or more of their
# drawn size, so the smallest text is 11 px or more on the page.
TEXT_PT, TITLE_PT = 11, 12


def new_figure(figsize: tuple[float, float], dpi: int = 100, rows: int = 1, columns: int = 1):
    """A figure and its axes, outside pyplot: pyplot keeps every figure in one global registry,
    which the server's threads would share (Matplotlib's advice for web servers)."""
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns)


# The streamed charts are palette pictures: a chart has a few hundred colours (most of them in its
# antialiased text), and PNG encodes a palette picture 3-5x faster and 3x smaller than an RGB one
# (about 1.5 ms against 6-10 ms a chart on a CPU, paid at every streamed picture update).
STREAMED_CHART_COLOURS = 224  # the palette's other 32 entries take the colours painted on it


def as_palette(picture: Image.Image) -> Image.Image:
    """``picture`` in a palette of ``STREAMED_CHART_COLOURS`` colours. Median cut keeps a chart's
    colours exact but in a few antialiased pixels (the fast octree moves even white to 254); it
    costs ~20 ms, once per drawn chart. No dithering: flat areas stay flat."""
    return picture.quantize(STREAMED_CHART_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def figure_to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


@functools.cache
def _label_font():
    """The font of text painted on a drawn chart: matplotlib's own, at the charts' title size."""
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")), round(TITLE_PT * 100 / 72))


@functools.lru_cache(maxsize=64)
def noise_level_chart(timesteps: tuple[int, ...], sigmas: tuple[float, ...]) -> NoiseLevelChart:
    """The chart of a schedule, drawn once per distinct schedule (runs of one schedule share it)."""
    return NoiseLevelChart(timesteps, sigmas)


class NoiseLevelChart:
    """Noise level sigma_t over the steps (log scale), drawn once; ``at(step)`` marks a step in ~1 ms.

    Redrawing a matplotlib figure at every streamed step costs ~150 ms on a CPU, so the curve is
    rendered once and the marker is painted on a copy of the picture.
    """

    def __init__(self, timesteps: Sequence[int], sigmas: Sequence[float]):
        self.timesteps, self.sigmas = list(timesteps), list(sigmas)
        figure, axis = new_figure((4.2, 2.4))
        steps = np.arange(1, len(sigmas) + 1)
        axis.plot(steps, sigmas, marker="o", markersize=2.5, color="#4a6fa5", linewidth=1.4)
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_xlabel("step", fontsize=TEXT_PT)
        axis.set_ylabel("noise level σ (log)", fontsize=TEXT_PT)
        axis.set_title(" ", fontsize=TITLE_PT)  # room for the step label painted by ``at``
        axis.tick_params(labelsize=TEXT_PT)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.canvas.draw()
        height = figure.canvas.get_width_height()[1]
        points = axis.transData.transform(np.column_stack([steps, sigmas]))
        self.pixels = [(x, height - y) for x, y in points]  # display origin is bottom-left
        self.base = as_palette(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3]))

    def at(self, step: int) -> Image.Image:
        """The chart with step ``step`` (1-based) marked and labelled."""
        from PIL import ImageDraw

        picture = self.base.copy()
        if 1 <= step <= len(self.pixels):
            x, y = self.pixels[step - 1]
            draw = ImageDraw.Draw(picture)
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(209, 73, 91))
            label = f"step {step}: t = {self.timesteps[step - 1]:.4g}, σ = {self.sigmas[step - 1]:.3g}"
            draw.text((picture.width // 2, 4), label, fill=(209, 73, 91), anchor="ma", font=_label_font())
        return picture


def concept_chart(
    steps: Sequence[int], series: dict[str, Sequence[float]], title: str, score_label: str,
    timesteps: Sequence[int] | None = None, train_timesteps: int = 1000,
) -> Image.Image:
    """Score vs step, one line per word (the concept chart of docs/methods.md, Token relevance).

    With ``timesteps`` (one per step) the scores are drawn against the model's time instead, from
    ``train_timesteps`` (pure noise) on the left to 0 on the right, with a tick under the axis where
    each step falls: charts of different schedules then share one axis.
    """
    figure, axis = new_figure((5.2, 2.8) if timesteps is None else (4.2, 3.6))
    x = list(steps if timesteps is None else timesteps)
    for label, values in series.items():
        axis.plot(x[: len(values)], values, marker="o", markersize=2.5, linewidth=1.3, label=label)
    _style_concept_axis(axis, title, score_label)
    if timesteps is not None:
        axis.set_xlim(train_timesteps, 0)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        axis.set_xlabel("time t (noise high → low); ticks: this schedule's steps", fontsize=TEXT_PT)
        axis.plot(x, [-0.03] * len(x), "|", color="black", markersize=8, clip_on=False)
        axis.legend(prop=word_font(TEXT_PT), loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=3, frameon=False)
    return figure_to_image(figure)


def _style_concept_axis(axis, title: str, score_label: str) -> None:
    """Titles, scales and the legend (of the lines already drawn) of a concept chart."""
    axis.set_title(title, fontsize=TITLE_PT)
    axis.set_xlabel("step", fontsize=TEXT_PT)
    axis.set_ylabel(score_label, fontsize=TEXT_PT)
    axis.set_ylim(-0.05, 1.05)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.tick_params(labelsize=TEXT_PT)
    axis.grid(alpha=0.3)
    if axis.get_lines():
        axis.legend(prop=word_font(TEXT_PT), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


@functools.lru_cache(maxsize=64)
def streaming_concept_chart(total_steps: int, words: tuple[str, ...], title: str, score_label: str) -> StreamingConceptChart:
    """The empty concept chart of a run's shape, drawn once (runs of one shape share it)."""
    return StreamingConceptChart(total_steps, words, title, score_label)


class StreamingConceptChart:
    """``concept_chart`` for streaming: axes, legend and colours drawn once; ``draw(series)`` paints
    the lines so far in ~1 ms instead of a ~200 ms matplotlib redraw at every streamed step."""

    def __init__(self, total_steps: int, words: Sequence[str], title: str, score_label: str):
        self.words = list(words)
        figure, axis = new_figure((5.2, 2.8))
        colours = [f"C{i}" for i in range(len(self.words))]
        for word, colour in zip(self.words, colours):  # legend entries only: the lines are painted
            axis.plot([], [], marker="o", markersize=2.5, linewidth=1.3, color=colour, label=word)
        axis.set_xlim(0.5, total_steps + 0.5)
        _style_concept_axis(axis, title, score_label)
        figure.tight_layout()
        figure.canvas.draw()
        self.height = figure.canvas.get_width_height()[1]
        self.to_pixels = axis.transData.transform
        self.colours = [tuple(int(255 * c) for c in matplotlib.colors.to_rgb(colour)) for colour in colours]
        self.base = as_palette(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3]))

    def draw(self, series: dict[str, Sequence[float]]) -> Image.Image:
        """The chart with each word's scores (steps 1, 2, ...) painted as a line with dots."""
        from PIL import ImageDraw

        picture = self.base.copy()
        pen = ImageDraw.Draw(picture)
        for word, colour in zip(self.words, self.colours):
            values = list(series.get(word, []))
            if not values:
                continue
            points = self.to_pixels(np.column_stack([np.arange(1, len(values) + 1), values]))
            points = [(float(x), self.height - float(y)) for x, y in points]  # display origin is bottom-left
            if len(points) > 1:
                pen.line(points, fill=colour, width=2)
            for x, y in points:
                pen.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        return picture


def token_bars(totals: dict[str, float], title: str, axis_label: str = "score summed over steps") -> Image.Image:
    """A bar per word: its score summed over the steps (or what ``axis_label`` says)."""
    figure, axis = new_figure((4.2, 2.8))
    labels = list(totals)
    axis.barh(range(len(labels)), list(totals.values()), color="#4a6fa5")
    axis.set_yticks(range(len(labels)), labels, fontproperties=word_font(TEXT_PT))
    axis.invert_yaxis()
    axis.set_title(title, fontsize=TITLE_PT)
    axis.set_xlabel(axis_label, fontsize=TEXT_PT)
    axis.tick_params(labelsize=TEXT_PT)
    return figure_to_image(figure)


def insertion_deletion_chart(scores: dict) -> Image.Image:
    """Insertion and deletion curves of one map, with their AUCs (docs/methods.md, Insertion and deletion)."""
    figure, axis = new_figure((4.6, 3.2))
    for curve, colour in (("insertion", "#2a9d8f"), ("deletion", "#d1495b")):
        values = np.asarray(scores[curve])
        x = np.linspace(0, 1, len(values))
        axis.plot(x, values, color=colour, marker="o", markersize=2.5, linewidth=1.4, label=f"{curve} (AUC {scores[curve + '_auc']:.3f})")
    axis.set_xlabel("share of the map's top spots\nrevealed (insertion) or removed (deletion)", fontsize=TEXT_PT)
    axis.set_ylabel(f"distance to the real next step\n({scores['distance']})", fontsize=TEXT_PT)
    axis.set_title("A good map: insertion falls fast,\ndeletion rises fast", fontsize=TITLE_PT)
    axis.tick_params(labelsize=TEXT_PT)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=TEXT_PT)
    return figure_to_image(figure)


@functools.lru_cache(maxsize=8)
def colour_bar(caption: str, tick_labels: tuple[str, ...] = ("0", "25%", "50%", "75%", "100%")) -> Image.Image:
    """The overlays' JET colour bar with evenly spaced ticks, labelled ``tick_labels`` from the
    bottom of the scale to its top, and ``caption`` under it (text at 11 px or more as shown)."""
    figure, axis = new_figure((5.2, 0.95))
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), "jet")
    bar = figure.colorbar(mappable, cax=axis, orientation="horizontal")
    bar.set_ticks(np.linspace(0, 1, len(tick_labels)), labels=list(tick_labels))
    bar.ax.tick_params(labelsize=TEXT_PT)
    bar.set_label(caption, fontsize=TEXT_PT)
    figure.subplots_adjust(left=0.04, right=0.96, top=0.92, bottom=0.55)
    return figure_to_image(figure)


def trajectory_chart(paths: dict[str, np.ndarray], variance: Sequence[float], title: str) -> Image.Image:
    """Each run's path through latent space (``views.latent_paths``): a line per run, its points
    coloured by step (dark: the noise it starts from, light: the end), a circle at the start and a
    star at the end."""
    figure, axis = new_figure((4.6, 3.6))
    colours = matplotlib.colormaps["viridis"]
    for index, (label, path) in enumerate(paths.items()):
        axis.plot(path[:, 0], path[:, 1], color=f"C{index}", linewidth=1.2, alpha=0.8, label=label)
        axis.scatter(path[:, 0], path[:, 1], c=np.linspace(0, 1, len(path)), cmap=colours, s=14, zorder=3)
        axis.scatter(*path[0], marker="o", s=60, facecolors="none", edgecolors="black", zorder=4)
        axis.scatter(*path[-1], marker="*", s=120, color=f"C{index}", edgecolors="black", zorder=4)
    axis.set_title(title, fontsize=TITLE_PT)
    axis.set_xlabel(f"first axis ({variance[0]:.0%} of the spread)", fontsize=TEXT_PT)
    axis.set_ylabel(f"second axis ({variance[1]:.0%})", fontsize=TEXT_PT)
    axis.tick_params(labelsize=TEXT_PT)
    axis.grid(alpha=0.3)
    axis.legend(prop=word_font(TEXT_PT), loc="best", frameon=False)
    return figure_to_image(figure)

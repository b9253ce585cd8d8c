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
        axis.set_xlabel("step", fontsize=8)
        axis.set_ylabel("noise level σ (log)", fontsize=8)
        axis.set_title(" ", fontsize=9)  # room for the step label painted by ``at``
        axis.tick_params(labelsize=7)
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
            label = f"step {step}: t = {self.timesteps[step - 1]}, sigma = {self.sigmas[step - 1]:.3g}"
            draw.text((picture.width // 2, 4), label, fill=(209, 73, 91), anchor="ma")  # PIL's default font: no Greek
        return picture


def concept_chart(
    steps: Sequence[int], series: dict[str, Sequence[float]], title: str, score_name: str = "attention mass"
) -> Image.Image:
    """Score vs step, one line per word (the concept chart of docs/methods.md, Token relevance)."""
    figure, axis = new_figure((5.2, 2.8))
    for label, values in series.items():
        axis.plot(steps[: len(values)], values, marker="o", markersize=2.5, linewidth=1.3, label=label)
    _style_concept_axis(axis, title, score_name)
    return figure_to_image(figure)


def _style_concept_axis(axis, title: str, score_name: str) -> None:
    """Titles, scales and the legend (of the lines already drawn) of a concept chart."""
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("step", fontsize=8)
    axis.set_ylabel(f"{score_name} (min-max per step)", fontsize=8)
    axis.set_ylim(-0.05, 1.05)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
    if axis.get_lines():
        axis.legend(prop=word_font(7), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


@functools.lru_cache(maxsize=64)
def streaming_concept_chart(total_steps: int, words: tuple[str, ...], title: str) -> StreamingConceptChart:
    """The empty concept chart of a run's shape, drawn once (runs of one shape share it)."""
    return StreamingConceptChart(total_steps, words, title)


class StreamingConceptChart:
    """``concept_chart`` for streaming: axes, legend and colours drawn once; ``draw(series)`` paints
    the lines so far in ~1 ms instead of a ~200 ms matplotlib redraw at every streamed step."""

    def __init__(self, total_steps: int, words: Sequence[str], title: str):
        self.words = list(words)
        figure, axis = new_figure((5.2, 2.8))
        colours = [f"C{i}" for i in range(len(self.words))]
        for word, colour in zip(self.words, colours):  # legend entries only: the lines are painted
            axis.plot([], [], marker="o", markersize=2.5, linewidth=1.3, color=colour, label=word)
        axis.set_xlim(0.5, total_steps + 0.5)
        _style_concept_axis(axis, title, "attention mass")
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


def token_bars(totals: dict[str, float], title: str) -> Image.Image:
    """Each word's score summed over the steps."""
    figure, axis = new_figure((4.2, 2.8))
    labels = list(totals)
    axis.barh(range(len(labels)), list(totals.values()), color="#4a6fa5")
    axis.set_yticks(range(len(labels)), labels, fontproperties=word_font(7))
    axis.invert_yaxis()
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("score summed over steps", fontsize=8)
    axis.tick_params(labelsize=7)
    return figure_to_image(figure)


def insertion_deletion_chart(scores: dict) -> Image.Image:
    """Insertion and deletion curves of one map, with their AUCs (docs/methods.md, Insertion and deletion)."""
    figure, axis = new_figure((4.6, 2.8))
    for curve, colour in (("insertion", "#2a9d8f"), ("deletion", "#d1495b")):
        values = np.asarray(scores[curve])
        x = np.linspace(0, 1, len(values))
        axis.plot(x, values, color=colour, marker="o", markersize=2.5, linewidth=1.4, label=f"{curve} (AUC {scores[curve + '_auc']:.3f})")
    axis.set_xlabel("fraction of latent pixels revealed (insertion) / removed (deletion)", fontsize=7)
    axis.set_ylabel(f"distance to real x_(t-1) ({scores['distance']})", fontsize=7)
    axis.set_title("Faithful: insertion falls fast (low AUC), deletion rises fast (high AUC)", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return figure_to_image(figure)

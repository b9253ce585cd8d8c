"""A synthetic "shapes" world: seeded 64x64 scenes with captions and masks."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
SIZES = {"small": 6.0, "big": 10.0}  # half extent in pixels
PLACES = {  # shape centre (x, y) in pixels
    "left": (14.0, 32.0),
    "right": (50.0, 32.0),
    "top": (32.0, 14.0),
    "bottom": (32.0, 50.0),
    "center": (32.0, 32.0),
}
PLACE_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
JITTER_PX = 2
TWO_SHAPE_PROBABILITY = 0.4

VOCABULARY = tuple(
    sorted(
        {"a", "an", "and", "on", "at", "in", "the"}
        | set(COLOURS)
        | set(SHAPES)
        | set(SIZES)
        | set(PLACES)
    )
)
TOLERATED_PUNCTUATION = (",", ".")

ALL_COMBOS = tuple(itertools.product(COLOURS, SHAPES, PLACES))  # 90 combos
HELD_OUT_SEED = 2024
HELD_OUT_COUNT = 14


@dataclass
class SceneShape:
    shape: str
    colour: str
    size: str
    place: str
    mask: np.ndarray = field(repr=False)  # bool (64, 64)


@dataclass
class Scene:
    image: np.ndarray = field(repr=False)  # uint8 (64, 64, 3)
    caption: str
    shapes: list[SceneShape]


def _pick_held_out() -> tuple[tuple[str, str, str], ...]:
    """Choose held-out (colour, shape, place) combos with a seeded rule.

    A combo is held out only if every (colour, shape), (colour, place) and
    (shape, place) pair it contains still appears at least twice in training.
    """
    rng = np.random.default_rng(HELD_OUT_SEED)
    order = rng.permutation(len(ALL_COMBOS))
    train = set(ALL_COMBOS)
    held = []
    for index in order:
        combo = ALL_COMBOS[index]
        rest = train - {combo}
        ok = all(
            sum(1 for c in rest if all(c[k] == combo[k] for k in pair)) >= 2
            for pair in ((0, 1), (0, 2), (1, 2))
        )
        if ok:
            held.append(combo)
            train = rest
        if len(held) == HELD_OUT_COUNT:
            break
    return tuple(sorted(held))


HELD_OUT_COMBOS = _pick_held_out()
TRAIN_COMBOS = tuple(c for c in ALL_COMBOS if c not in set(HELD_OUT_COMBOS))


def check_vocabulary(prompt: str) -> None:
    """Raise ValueError if the prompt uses words outside the vocabulary."""
    words = re.sub(r"[,.]", " ", prompt.lower()).split()
    unknown = [w for w in dict.fromkeys(words) if w not in VOCABULARY]
    if unknown:
        listed = ", ".join(f"'{w}'" for w in unknown)
        raise ValueError(
            f"Words not in the shapes model's vocabulary: {listed}. "
            f"Known words: {', '.join(VOCABULARY)}."
        )


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def shape_mask(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean 64x64 mask of an axis-aligned shape (triangle points up)."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        side = half * 0.88
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "triangle":
        radius = half * 1.3  # circumradius, centroid at (cx, cy)
        bottom = dy <= radius / 2
        slope = np.sqrt(3.0)  # edges at +-60 degrees from the apex
        left_edge = dy >= -radius - slope * dx
        right_edge = dy >= -radius + slope * dx
        return bottom & left_edge & right_edge
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator) -> np.ndarray:
    """Plain or textured greyish background, float (64, 64, 3)."""
    base = rng.uniform(95, 205)
    tint = rng.uniform(-6, 6, size=3)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    kind = rng.integers(0, 5)
    if kind == 0:
        texture = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    elif kind == 1:  # fine noise
        texture = rng.uniform(-12, 12, size=(IMAGE_SIZE, IMAGE_SIZE))
    elif kind == 2:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * xs + np.sin(angle) * ys) / IMAGE_SIZE
        texture = 30 * (ramp - ramp.mean())
    elif kind == 3:  # stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 16)
        phase = (np.cos(angle) * xs + np.sin(angle) * ys) / period
        texture = 12 * np.sign(np.sin(2 * np.pi * phase))
    else:  # checkerboard
        cell = int(rng.integers(4, 12))
        texture = 10 * (((xs // cell + ys // cell) % 2) * 2 - 1)
    image = base + texture[..., None] + tint[None, None, :]
    return image


def _describe(item: SceneShape, rng: np.random.Generator, short: bool) -> str:
    if short:
        size = f"{item.size} " if rng.random() < 0.3 else ""
        return f"{size}{item.colour} {item.shape}, {item.place}"
    size = f"{item.size} " if rng.random() < 0.5 else ""
    article = "an" if (size or item.colour).startswith("o") else "a"
    return f"{article} {size}{item.colour} {item.shape} {PLACE_PHRASES[item.place]}"


def caption_for(shapes: list[SceneShape], rng: np.random.Generator) -> str:
    """Template caption for the given shapes."""
    short = rng.random() < 0.25
    return " and ".join(_describe(item, rng, short) for item in shapes)


def generate_scene(seed_or_rng, split: str = "train", n_shapes: int | None = None) -> Scene:
    """Generate one scene deterministically from a seed or numpy Generator.

    split="train" never uses held-out combos; split="any" uses all combos.
    """
    rng = _rng(seed_or_rng)
    combos = TRAIN_COMBOS if split == "train" else ALL_COMBOS
    if n_shapes is None:
        n_shapes = 2 if rng.random() < TWO_SHAPE_PROBABILITY else 1
    image = _background(rng)
    while True:
        picks = [combos[i] for i in rng.choice(len(combos), size=n_shapes)]
        if len({p[2] for p in picks}) < n_shapes:
            continue
        shapes = []
        for colour, shape, place in picks:
            size = ("small", "big")[int(rng.integers(0, 2))]
            cx, cy = PLACES[place]
            cx += rng.integers(-JITTER_PX, JITTER_PX + 1)
            cy += rng.integers(-JITTER_PX, JITTER_PX + 1)
            mask = shape_mask(shape, cx, cy, SIZES[size])
            shapes.append(SceneShape(shape, colour, size, place, mask))
        if n_shapes == 1:
            break
        grown = np.zeros_like(shapes[0].mask)
        grown[:-1] |= shapes[0].mask[1:]
        grown[1:] |= shapes[0].mask[:-1]
        grown[:, :-1] |= shapes[0].mask[:, 1:]
        grown[:, 1:] |= shapes[0].mask[:, :-1]
        if not (grown | shapes[0].mask)[shapes[1].mask].any():
            break
    for item in shapes:
        colour = np.array(COLOURS[item.colour], np.float32) + rng.uniform(-12, 12, 3)
        image[item.mask] = colour
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Scene(image=image, caption=caption_for(shapes, rng), shapes=shapes)


def render_scene(items: list[tuple[str, str, str, str]], seed: int, centres: list[tuple[float, float]] | None = None) -> Scene:
    """A scene of exactly these (colour, shape, size, place) items on a background drawn from ``seed``, with
    the world's colour jitter and a caption; ``centres`` overrides the places' centres (the segmentation
    benchmark's touching shapes). Later items are drawn over earlier ones, and their masks are cut from them."""
    rng = _rng(seed)
    image = _background(rng)
    shapes = []
    for index, (colour, shape, size, place) in enumerate(items):
        cx, cy = centres[index] if centres else PLACES[place]
        mask = shape_mask(shape, cx, cy, SIZES[size])
        for earlier in shapes:
            earlier.mask &= ~mask
        shapes.append(SceneShape(shape, colour, size, place, mask))
    for item in shapes:
        image[item.mask] = np.array(COLOURS[item.colour], np.float32) + rng.uniform(-12, 12, 3)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Scene(image=image, caption=caption_for(shapes, rng), shapes=shapes)


def evaluation_prompts(n: int = 200) -> list[tuple[str, str, str, str]]:
    """N single-shape prompts from held-out combos: (prompt, colour, shape, place)."""
    rng = np.random.default_rng(7)
    prompts = []
    for i in range(n):
        colour, shape, place = HELD_OUT_COMBOS[i % len(HELD_OUT_COMBOS)]
        item = SceneShape(shape, colour, ("small", "big")[i % 2], place, np.zeros(0, bool))
        prompts.append((caption_for([item], rng), colour, shape, place))
    return prompts

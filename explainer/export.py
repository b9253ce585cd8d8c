"""Files of a finished run: an animation of the denoising and a ZIP that reproduces it."""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from . import config
from .render import pictures, views
from .run import RunData


def animation(run: RunData, path: Path, view: str = "prediction", frame_ms: int = 200) -> Path:
    """A GIF of the step pictures (``view``: prediction or noisy), the final image held at the end."""
    if not run.records:
        raise ValueError("The run has no steps to animate yet.")
    frames = [pictures.for_display(pictures.step_picture(r, view), 256).convert("RGB") for r in run.records]
    if run.final_image is not None:
        frames.append(pictures.for_display(run.final_image, 256).convert("RGB"))
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 8]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return Path(path)


def export_zip(run: RunData, path: Path) -> Path:
    """Write a ZIP: per-step pictures, attention maps as .npy and overlays as .png, and run.json.

    ``run.json`` holds every setting, the timesteps, tokens, scheduler config and library versions
    (``RunData.reproduction``), plus each step's summary, so the run can be made again exactly.
    """
    if not run.records:
        raise ValueError("The run has no steps to export yet.")
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for record in run.records:
            stem = f"step_{record.index:03d}"
            for view in ("prediction", "noisy"):
                archive.writestr(f"{stem}/{view}.png", _png(pictures.step_picture(record, view)))
            archive.writestr(f"{stem}/attention.npy", _npy(record.attention))
            for index, (picture, label) in enumerate(views.word_overlays(run, record)):
                archive.writestr(f"{stem}/attention_{index:02d}_{_safe(label)}.png", _png(picture))
        if run.final_image is not None:
            archive.writestr("final.png", _png(run.final_image))
        if run.source_image is not None:  # an image run: the picture it explains, at the run's size
            archive.writestr("source.png", _png(run.source_image))
        record = {
            "reproduction": run.reproduction,
            "attention_rows": views.token_labels(run, include_special=True),
            "steps": [views.step_summary(run, r) for r in run.records],
        }
        archive.writestr("run.json", strict_json(record))
    return path


def file_stem(run: RunData) -> str:
    """A file name that says what the run is: its prompt as a slug and its seed ("a-red-circle-seed1")."""
    slug = re.sub(r"[^a-z0-9]+", "-", run.settings.prompt.lower()).strip("-")[:40].rstrip("-") or "run"
    return f"{slug}-seed{run.settings.seed}"


def strict_json(record) -> str:
    """JSON that every parser reads: a non-finite number (a scheduler's ``-inf`` clip) is written as
    the string Python's ``float()`` reads back ("-inf"), and a path inside the repository as a path
    relative to it; anything else that JSON lacks raises TypeError instead of being written as ``str``."""
    return json.dumps(_portable(record), indent=2, allow_nan=False)


def _portable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan"
    if isinstance(value, dict):
        return {str(key): _portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(item) for item in value]
    if isinstance(value, Path):
        return config.portable_path(value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _portable(value.item())
    return value


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)[:40] or "token"

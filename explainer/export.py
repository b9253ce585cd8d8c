"""Files of a finished run: an animation of the denoising and a ZIP that reproduces it."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from . import views
from .run import RunData


def animation(run: RunData, path: Path, view: str = "prediction", frame_ms: int = 200) -> Path:
    """A GIF of the step pictures (``view``: prediction or noisy), the final image held at the end."""
    if not run.records:
        raise ValueError("The run has no steps to animate yet.")
    frames = [views.for_display(views.step_picture(r, view), 256).convert("RGB") for r in run.records]
    if run.final_image is not None:
        frames.append(views.for_display(run.final_image, 256).convert("RGB"))
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
                archive.writestr(f"{stem}/{view}.png", _png(views.step_picture(record, view)))
            archive.writestr(f"{stem}/attention.npy", _npy(record.attention))
            for index, (picture, label) in enumerate(views.word_overlays(run, record)):
                archive.writestr(f"{stem}/attention_{index:02d}_{_safe(label)}.png", _png(picture))
        if run.final_image is not None:
            archive.writestr("final.png", _png(run.final_image))
        record = {
            "reproduction": run.reproduction,
            "attention_rows": views.token_labels(run, include_special=True),
            "steps": [views.step_summary(run, r) for r in run.records],
        }
        archive.writestr("run.json", json.dumps(record, indent=2, default=str))
    return path


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

"""What one visitor has run: the last few runs (bounded) and a private folder for their files."""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

from explainer.run import RunData

from .settings import APP

OUTPUT_ROOT = Path(tempfile.gettempdir()) / "diffusion-xray"
NO_RUN = "No run yet: run the model on the Denoise tab (or call /denoise) first."


class Session:
    """Keeps at most ``limit`` groups of runs (a prompt, or two compared), newest last.

    Scrubbing, switching words or exporting reads these records; nothing is recomputed. Files
    written for the visitor go to a folder of the session's own, removed by ``close()``.
    """

    def __init__(self, limit: int = APP.max_runs_per_session):
        self.limit = limit
        self.groups: OrderedDict[int, list[RunData]] = OrderedDict()
        self._next_id = 1
        OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="session-", dir=OUTPUT_ROOT))

    def add(self, runs: list[RunData]) -> int:
        group_id = self._next_id
        self._next_id += 1
        self.groups[group_id] = runs
        while len(self.groups) > self.limit:
            self.groups.popitem(last=False)
        return group_id

    def latest(self) -> list[RunData]:
        if not self.groups:
            raise ValueError(NO_RUN)
        return next(reversed(self.groups.values()))

    def run(self, which: int = 0) -> RunData:
        """Run ``which`` (0: the first prompt, 1: the second) of the latest group."""
        runs = self.latest()
        if not 0 <= which < len(runs):
            raise ValueError("There is no second prompt in the latest run." if which else "No run yet.")
        return runs[which]

    def file(self, name: str) -> Path:
        """A path in the session's own folder (created if the folder was cleaned meanwhile)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / name

    def close(self) -> None:
        self.groups.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def current(session: Session | None) -> list[RunData]:
    """The latest group of runs of a visitor's session (``None`` before the first run: refused)."""
    if session is None:
        raise ValueError(NO_RUN)
    return session.latest()


def check_step(run: RunData, value, name: str = "step") -> int:
    """``value`` as a step of ``run`` (1-based); a ValueError naming ``name``, the run's own range
    and the value otherwise (the page's sliders know only their first maximum)."""
    if not 1 <= int(value) <= len(run.records):
        raise ValueError(f"{name} must be between 1 and {len(run.records)}, got {value}.")
    return int(value)


def close(session: Session | None) -> None:
    """Remove a finished session's files (the session state's delete callback)."""
    if session is not None:
        session.close()

"""What one visitor has run: the last few runs (bounded) and a private folder for their files; and
the runs kept by run id (bounded too), for callers that have no session of their own."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
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


class RunIds:
    """The latest ``limit`` runs by run id, the oldest dropped: how a caller without a session of its
    own (an MCP agent: Gradio's MCP server calls every tool through one shared client) names a run.

    An id is unguessable (``secrets.token_urlsafe``), so knowing it is what lets one read the run.
    Each run gets a one-run ``Session`` with a folder of its own for the files made from it.
    Handlers run in several threads at once, hence the lock.
    """

    def __init__(self, limit: int = APP.max_registered_runs):
        self.limit = limit
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, runs: list[RunData]) -> str:
        session = Session(limit=1)
        session.add(runs)  # the same objects the visitor's session holds: filled in place while running
        run_id = secrets.token_urlsafe(16)
        with self.lock:
            self.sessions[run_id] = session
            dropped = [self.sessions.popitem(last=False)[1] for _ in range(len(self.sessions) - self.limit)]
        for old in dropped:
            old.close()
        return run_id

    def get(self, run_id: str) -> Session:
        with self.lock:
            session = self.sessions.get(run_id)
        if session is None:
            raise ValueError(f"Unknown run_id {run_id!r}: no run has that id, or it was dropped (the app keeps the "
                             f"last {self.limit} runs). Run /denoise again for a new run_id, or leave run_id empty "
                             "for this session's latest run.")
        return session


RUNS = RunIds()


def by_run_id(session: Session | None, run_id: str | None) -> Session | None:
    """What a request reads: the run ``run_id`` names (a ValueError if unknown), or, when it is
    empty, the visitor's own session. Over MCP an empty id is refused: every agent's calls share one
    Gradio client, so "the session's latest run" could be another agent's."""
    run_id = (run_id or "").strip()
    if run_id:
        return RUNS.get(run_id)
    if over_mcp():
        raise ValueError("Give run_id, the id the denoise tool returned: over MCP every agent shares one session, "
                         "so its latest run may be another agent's.")
    return session


def over_mcp() -> bool:
    """Whether the request being handled came through Gradio's MCP server (its client marks them)."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return request is not None and request.headers.get("x-gradio-user") == "mcp"


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

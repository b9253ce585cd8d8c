"""A method's options as a person sees them: each user-facing dataclass field carries its label,
a one-sentence help, and its choices or bounds. A user interface draws its controls from these
(``described``); a field without them is an option for code only.

Example:
    >>> keep: float = option(0.5, "Keep probability p", bounds=(0.05, 0.95), step=0.05)
    >>> [field.name for field in described(DFRise)]  # ['n_masks', 'keep', 'mask', 'mode', ...]
"""

from __future__ import annotations

import dataclasses


def option(default, label: str, help: str = "", *, choices: tuple | None = None,
           bounds: tuple[float, float] | None = None, step: float | None = None):
    """A dataclass field with ``default`` and what a control for it shows: ``label``, ``help`` (one
    sentence; "" for none), the ``choices`` a value must be one of, or the ``bounds`` (low, high) a
    control offers and its ``step`` (the method's own check still decides what is allowed)."""
    metadata = {"label": label, "help": help, "choices": choices, "bounds": bounds, "step": step}
    return dataclasses.field(default=default, metadata=metadata)


def described(method) -> list[dataclasses.Field]:
    """The fields of ``method`` (a method class or instance) made with ``option``, in the order its
    class declares them (a field it redeclares from a base class where it redeclares it), then the
    inherited ones."""
    own = list(vars(method if isinstance(method, type) else type(method)).get("__annotations__", {}))
    fields = [field for field in dataclasses.fields(method) if "label" in field.metadata]
    return sorted(fields, key=lambda field: own.index(field.name) if field.name in own else len(own))

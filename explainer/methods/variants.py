"""Named option sets of the methods, one registry for the evaluation, the meaning checks and the
app: every method under its own name with its defaults, and the variants compared with them (the
paper's rules where the defaults differ, and other options).

    >>> VARIANTS["df-cam-paper"].build().explain(model, run, step=15)
    >>> VARIANTS["relevance"].build(word="circle")  # options given here win over the variant's
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import METHODS
from .base import Method


@dataclass(frozen=True)
class Variant:
    """Method ``method`` with ``options`` set; ``label`` is what a person reads."""

    name: str
    method: str
    label: str
    options: dict = field(default_factory=dict)

    def build(self, **overrides) -> Method:
        """The method with this variant's options, ``overrides`` on top (e.g. a batch size)."""
        return METHODS[self.method](**(self.options | overrides))


_COMPARED = (
    Variant("df-rise-structure", "df-rise", "DF-RISE (the SSIM structure term)", {"similarity": "structure"}),
    Variant("df-rise-paper", "df-rise", "DF-RISE (the paper's score and sum)", {"mode": "paper", "estimator": "sum"}),
    Variant("df-cam-paper", "df-cam", "DF-CAM (the paper's rules)", {"target": "sum", "weighting": "grad-cam", "layer_scale": "min-max"}),
    Variant("df-cam-gradcam", "df-cam", "DF-CAM (Grad-CAM weights, min-max)", {"weighting": "grad-cam", "layer_scale": "min-max"}),
    Variant("df-cam-hirescam", "df-cam", "DF-CAM (HiResCAM weights)", {"weighting": "hirescam"}),
    Variant("df-cam-abs", "df-cam", "DF-CAM (abs)", {"rectify": "abs"}),
    Variant("df-lime-paper", "df-lime", "DF-LIME (the paper's output)", {"output": "paper"}),
    Variant("relevance-paper", "relevance", "token relevance (the paper's relu)", {"rectify": "relu"}),
)

VARIANTS: dict[str, Variant] = {
    **{name: Variant(name, name, method.label) for name, method in METHODS.items()},
    **{variant.name: variant for variant in _COMPARED},
}


def variant(name: str) -> Variant:
    """The variant ``name``; a ValueError naming the known ones otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown method variant {name!r}; known: {', '.join(VARIANTS)}.")
    return VARIANTS[name]

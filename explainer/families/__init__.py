"""Model families: one adapter each behind one interface (``Family``; see docs/architecture.md).

    >>> family = FAMILIES["sd1"]
    >>> conditioning = family.encode(pipe, "a red circle", "", guided=True)
"""

from .base import Conditioning, Family
from .flux import Flux
from .sd1 import StableDiffusion1
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {
    family.name: family for family in (StableDiffusion1(), StableDiffusion3(), StableDiffusionXL(), Flux())
}


def family_of_pipeline_class(class_name: str) -> str:
    """The family whose pipeline a saved folder's ``model_index.json`` names (its ``_class_name``)."""
    for name, adapter in FAMILIES.items():
        if adapter.pipeline_class == class_name:
            return name
    raise ValueError(f"No model family loads a {class_name}; known: "
                     f"{', '.join(adapter.pipeline_class for adapter in FAMILIES.values())}.")


def family(name: str) -> Family:
    """The adapter of family ``name``; a ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Conditioning", "Family", "Flux", "StableDiffusion1", "StableDiffusion3", "StableDiffusionXL", "family",
           "family_of_pipeline_class"]

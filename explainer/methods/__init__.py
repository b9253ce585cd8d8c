"""The paper's explanation methods, one interface (docs/methods.md): ``method.explain(model, run, step)``.

    >>> from explainer.methods import METHODS
    >>> explanation = METHODS["df-rise"](n_masks=200).explain(model, run, step=15)
    >>> explanation.saliency.shape, explanation.denoiser_calls
"""

from .base import CentreBaseline, Explanation, Method, RandomBaseline
from .cam import DFCam, cam_layers
from .concept_attention import ConceptAttention
from .lime import DFLime
from .region import SpotAttention
from .relevance import TokenRelevance, cheap_token_scores, relevance_series
from .rise import DFRise

METHODS: dict[str, type[Method]] = {
    method.name: method for method in (TokenRelevance, DFRise, DFCam, DFLime, RandomBaseline, CentreBaseline)
}

from .variants import VARIANTS, Variant, variant  # noqa: E402 (the registry reads METHODS)

__all__ = [
    "METHODS",
    "CentreBaseline",
    "ConceptAttention",
    "DFCam",
    "DFLime",
    "DFRise",
    "Explanation",
    "Method",
    "RandomBaseline",
    "SpotAttention",
    "TokenRelevance",
    "VARIANTS",
    "Variant",
    "variant",
    "cam_layers",
    "cheap_token_scores",
    "relevance_series",
]

"""One registry of method variants: what the evaluation scores and what the app offers come from it."""

import pytest

from explainer.evaluate.protocol import ATTENTION_MAPS, MAP_METHODS
from explainer.methods import METHODS, VARIANTS, variant


def test_every_method_is_a_variant_with_its_defaults_and_every_variant_builds():
    for name, method in METHODS.items():
        assert VARIANTS[name].options == {} and VARIANTS[name].label == method.label
    for chosen in VARIANTS.values():
        built = chosen.build()
        assert isinstance(built, METHODS[chosen.method])
        assert all(built.options[key] == value for key, value in chosen.options.items())
    assert VARIANTS["relevance"].build(word="circle").word == "circle"  # options given at build time win


def test_the_evaluation_scores_registered_variants():
    assert set(MAP_METHODS) - set(VARIANTS) == set(ATTENTION_MAPS)  # the attention maps: not saliency variants
    with pytest.raises(ValueError, match="Unknown method variant 'df-cam-max'; known: relevance, df-rise"):
        variant("df-cam-max")


def test_the_saliency_tab_offers_every_method_that_asks_for_it():
    from ui.saliency import SALIENCY_METHODS

    assert SALIENCY_METHODS == {"DF-RISE": "df-rise", "DF-CAM": "df-cam", "DF-LIME": "df-lime",
                                "random baseline": "random", "centred baseline": "centre"}

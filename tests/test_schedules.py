import math

import numpy as np
import pytest

from explainer.schedules import check_explicit, parse_timestep_list, timesteps


def spec_early(n, concentration):
    """docs/methods.md, Schedules, written out independently of the library."""
    a = 1000 ** (1 / (n + concentration))
    t = [1000 - math.floor(a ** (i + 1 + concentration)) for i in range(n)]
    return [999] + t[:-1]


def spec_latter(n, concentration):
    a = 1000 ** (1 / (n + concentration))
    t = sorted((math.floor(a ** (i + 1 + concentration)) for i in range(n)), reverse=True)
    return [999 if v == 1000 else v for v in t]


def test_uniform_is_left_to_the_scheduler():
    assert timesteps("uniform", 30) is None
    assert timesteps("early", 30, concentration=0) is None


@pytest.mark.parametrize("n, concentration", [(30, 60), (20, 60), (5, 2), (10, 20)])
def test_early_and_latter_follow_the_spec(n, concentration):
    assert timesteps("early", n, concentration) == spec_early(n, concentration)
    assert timesteps("latter", n, concentration) == spec_latter(n, concentration)


def test_paper_defaults_concentrate_where_expected():
    early, latter = timesteps("early", 30, 60), timesteps("latter", 30, 60)
    for values in (early, latter):
        assert len(values) == 30 and values[0] == 999
        assert all(a > b for a, b in zip(values, values[1:]))
        assert all(0 <= v <= 999 for v in values)
    # early: small gaps at high t (noisy); latter: small gaps at low t (clean)
    early_gaps, latter_gaps = -np.diff(early), -np.diff(latter)
    assert early_gaps[:10].mean() < early_gaps[-10:].mean()
    assert latter_gaps[:10].mean() > latter_gaps[-10:].mean()


def test_repeated_timesteps_are_refused():
    with pytest.raises(ValueError, match="repeats timesteps"):
        timesteps("early", 100, concentration=60)


@pytest.mark.parametrize(
    "values, message",
    [([], "empty"), ([500, 600], "strictly decreasing"), ([1000, 10], "out of range"), ([900, -1], "out of range")],
)
def test_explicit_lists_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        check_explicit(values)


def test_bad_kind_and_concentration():
    with pytest.raises(ValueError, match="schedule must be one of"):
        timesteps("cosine", 10)
    with pytest.raises(ValueError, match="concentration"):
        timesteps("early", 10, concentration=-1)


def test_parse_text_list():
    assert parse_timestep_list("999, 700; 300") == [999, 700, 300]
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_timestep_list("999, abc")

"""The library's outputs equal those saved before the architecture's refactoring (tests/reference.py):
bit-identical on the machine that saved them; elsewhere (other CPU kernels) within float32 rounding."""

import numpy as np
import pytest

from reference import SAVED, compute, machine


@pytest.fixture(scope="module")
def saved():
    if not SAVED.is_file():
        pytest.skip("no saved references: python tests/reference.py --save")
    with np.load(SAVED) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.slow
def test_outputs_equal_the_saved_references(saved):
    same_machine = str(saved.pop("__machine__")) == machine()
    now = compute()
    assert sorted(now) == sorted(saved)
    for key, expected in saved.items():
        if same_machine:
            np.testing.assert_array_equal(now[key], expected, err_msg=key)
        else:
            np.testing.assert_allclose(now[key], expected, rtol=1e-4, atol=1e-5, err_msg=key)

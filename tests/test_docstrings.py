"""The runnable (``>>>``) examples in the public docstrings execute and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "ppl.grad",
    "ppl.dsl",
    "ppl.marginal",
    "ppl.transforms.estimators",
    "ppl.transforms.kronecker",
    "ppl.transforms.nngp",
    "ppl.transforms.fbm",
    "ppl.inference.svi",
    "ppl.inference.sbl",
    "ppl.inference.nngp",
    "ppl.inference.fbm",
    "ppl.models.nngp",
    "ppl.models.fbm_sde",
    "ppl.models.fbm_video",
    "ppl.distributions",
    "ppl.transforms.state_space",
    "ppl.inference.kalman",
    "ppl.inference.funbat",
    "ppl.models.funbat",
    "ppl.sparse",
    "ppl.transforms.subspace",
    "ppl.inference.ssvi",
    "ppl.models.bnn",
    "ppl.interop",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

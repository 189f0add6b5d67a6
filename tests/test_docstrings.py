"""The runnable (``>>>``) examples in the public docstrings execute and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["ppl.grad", "ppl.dsl", "ppl.marginal", "ppl.transforms.estimators", "ppl.inference.svi"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

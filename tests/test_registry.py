"""The method registry: a method is registered once, where it is defined, with its inputs and options
read from its signature."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam.methods import registry
from flaxcam.methods.registry import INPUTS, METHODS, register
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of METHODS that a test may register into without leaving entries behind."""
    monkeypatch.setattr(registry, "METHODS", dict(METHODS))
    return registry.METHODS


def test_every_method_takes_exactly_its_registered_inputs_and_options():
    for name, method in METHODS.items():
        parameters = inspect.signature(method.fn).parameters
        assert method.name == name
        assert method.inputs == tuple(p for p in parameters if p in INPUTS), name
        assert set(parameters) == set(method.inputs) | set(method.options) | ({"chunk_size"} & set(parameters)), name


def test_register_reads_inputs_and_options_from_the_signature(scratch_registry):
    @register("weighted_gradcam_test")
    def weighted(activations, gradients, power: float = 2.0):
        return activations * jnp.mean(gradients, axis=(0, 1)) ** power

    method = scratch_registry["weighted_gradcam_test"]
    assert method.fn is weighted
    assert method.inputs == ("activations", "gradients")
    assert method.options == {"power": 2.0}
    assert method.needs_gradients and not method.needs_head


def test_a_registered_method_runs_in_explain_equal_to_its_formula(scratch_registry):
    """A method written in one place (here: Grad-CAM with squared weights) works through explain."""

    @register("squared_gradcam_test")
    def squared(activations, gradients, power: float = 2.0):
        weights = jnp.mean(gradients, axis=(0, 1))
        return activations * jnp.sign(weights) * jnp.abs(weights) ** power

    model = UserNet()
    variables, images = _setup(model, (2, 16, 20, 3), seed=3)
    ours = flaxcam.explain(
        model, variables, images, method="squared_gradcam_test", layer="mid", method_options={"power": 1.0}
    )
    plain = flaxcam.explain(model, variables, images, method="gradcam", layer="mid")
    np.testing.assert_allclose(np.asarray(ours.raw), np.asarray(plain.raw), rtol=1e-5, atol=1e-6)
    squared_out = flaxcam.explain(model, variables, images, method="squared_gradcam_test", layer="mid")
    assert np.abs(np.asarray(squared_out.low_res) - np.asarray(plain.low_res)).max() > 1e-3


def test_a_name_registered_twice_or_a_parameter_that_is_neither_input_nor_option_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register("gradcam")(lambda activations, gradients: activations)
    with pytest.raises(TypeError, match="no default"):

        @register("bad_method_test")
        def bad(activations, weights):
            return activations

    assert "bad_method_test" not in scratch_registry


def test_unknown_method_error_lists_the_registered_names():
    with pytest.raises(ValueError, match="available: .*gradcam"):
        flaxcam.methods.get_method("no_such_method")

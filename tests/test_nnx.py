"""NNX models, first-class: every method on an NNX model equals its linen twin (same weights), the
user's module is never modified, and the explainer step composes with jit / vmap / scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flaxcam
from flaxcam import step as step_module
from tests.helpers import UserNet
from tests.helpers import user_net_setup as _setup


class Block(nnx.Module):
    def __init__(self, cin: int, cout: int, strides: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=strides, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.conv(x))


class NNXUserNet(nnx.Module):
    """The NNX twin of test_explain.UserNet: stem / mid / top blocks, global average pooling, Linear."""

    def __init__(self, rngs: nnx.Rngs, num_classes: int = 6):
        self.stem = Block(3, 8, 1, rngs)
        self.mid = Block(8, 12, 2, rngs)
        self.top = Block(12, 16, 1, rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.top(self.mid(self.stem(x))).mean((1, 2)))


class WithNorm(nnx.Module):
    """A conv, a BatchNorm (training mode until ``eval()``) and a head: for the eval-mode checks."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.conv(x))).mean((1, 2)))


def _twin(variables) -> NNXUserNet:
    """An NNX UserNet holding the linen model's weights."""
    model = NNXUserNet(nnx.Rngs(0))
    params = variables["params"]
    for name in ("stem", "mid", "top"):
        getattr(model, name).conv.kernel[...] = params[name]["conv"]["kernel"]
        getattr(model, name).conv.bias[...] = params[name]["conv"]["bias"]
    model.head.kernel[...] = params["head"]["kernel"]
    assert model.head.bias is not None  # use_bias=True
    model.head.bias[...] = params["head"]["bias"]
    return model


@pytest.fixture(scope="module")
def twins():
    linen = UserNet()
    variables, images = _setup(linen, (2, 12, 14, 3))
    return linen, variables, _twin(variables), images


def _snapshot(model: nnx.Module):
    return nnx.graphdef(model), jax.tree_util.tree_map(np.array, nnx.state(model))


def _assert_unchanged(model: nnx.Module, snapshot) -> None:
    graphdef, state = snapshot
    assert nnx.graphdef(model) == graphdef
    for before, after in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(nnx.state(model))):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_list_layers_uses_attribute_paths(twins):
    _, _, model, images = twins
    names = [info.name for info in flaxcam.list_layers(model, images)]
    assert names == ["stem.conv", "stem", "mid.conv", "mid", "top.conv", "top", "head"]
    np.testing.assert_allclose(
        np.asarray(model(images)), np.asarray(twins[0].apply(twins[1], images)), rtol=1e-6, atol=1e-6
    )


# Every method that explains a CNN layer; the attention methods (LeGrad) read a vision transformer's
# attention probabilities, which these CNN twins do not have (their invariants run on a ViT in
# test_methods_invariants.py).
METHOD_LAYERS = [
    (name, layer)
    for name, method in flaxcam.METHODS.items()
    if not method.attention_layers
    for layer in ((None,) if method.bias_layers else ("top",) if method.needs_head else ("mid", "top"))
]


@pytest.mark.parametrize(("method", "layer"), METHOD_LAYERS)
def test_every_method_on_nnx_equals_its_linen_twin(twins, method, layer):
    linen, variables, model, images = twins
    snapshot = _snapshot(model)
    options = {"num_samples": 2} if method in ("sscam", "iscam", "smoothgradcam++") else None
    kwargs = {"method": method, "layer": layer, "top_k": 2, "method_options": options}
    expected = flaxcam.explain(linen, variables, images, **kwargs)
    got = flaxcam.explain(model, images, **kwargs)
    np.testing.assert_array_equal(np.asarray(got.targets), np.asarray(expected.targets))
    np.testing.assert_allclose(np.asarray(got.low_res), np.asarray(expected.low_res), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.maps), np.asarray(expected.maps), atol=1e-5)
    assert got.layer == expected.layer
    _assert_unchanged(model, snapshot)


def test_explainer_composes_with_jit_vmap_and_scan(twins):
    _, _, model, images = twins
    fn = flaxcam.explainer(model, method="gradcam", layer="mid")
    state = nnx.state(model)
    eager = fn(state, images)
    before = step_module.TRACE_COUNT
    jitted = jax.jit(fn)
    first = jitted(state, images)
    jitted(state, images * 2.0)  # same shapes: no new trace
    assert before + 1 == step_module.TRACE_COUNT
    jitted(state, images[:1])  # a new shape: one more
    assert before + 2 == step_module.TRACE_COUNT
    np.testing.assert_allclose(np.asarray(first.maps), np.asarray(eager.maps), atol=1e-6)

    # an ensemble of 4 weight sets (scaled copies) in one vmapped call == 4 separate calls
    scales = jnp.asarray([0.5, 1.0, 1.5, 2.0])
    stacked = jax.vmap(lambda s: jax.tree_util.tree_map(lambda p: p * s, state))(scales)
    ensemble = jax.jit(jax.vmap(fn, in_axes=(0, None)))(stacked, images)
    for i, s in enumerate(np.asarray(scales)):
        alone = fn(jax.tree_util.tree_map(lambda p: p * s, state), images)
        np.testing.assert_allclose(np.asarray(ensemble.maps[i]), np.asarray(alone.maps), atol=1e-5)

    def body(carry, x):
        return carry + fn(state, x[None]).maps.sum(), None

    total, _ = jax.lax.scan(body, jnp.zeros(()), images)
    np.testing.assert_allclose(float(total), float(eager.maps.sum()), rtol=1e-5)


def test_errors(twins):
    _linen, _variables, model, images = twins
    with pytest.raises(TypeError, match="NNX model carries its own state"):
        flaxcam.explain(model, nnx.state(model), images)
    with pytest.raises(flaxcam.LayerError, match=r"unknown layer 'layer9'.*stem.*mid.*top"):
        flaxcam.explain(model, images, layer="layer9")

    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.head = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.conv(self.conv(x)).mean((1, 2)))

    with pytest.raises(flaxcam.LayerError, match="'conv' is called 2 times"):
        flaxcam.explain(Twice(nnx.Rngs(0)), images, layer="conv")

    training = WithNorm(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"training mode \(norm \(BatchNorm\)\).*model.eval\(\)"):
        flaxcam.explain(training, images)
    training.eval()
    snapshot = _snapshot(training)
    for method in ("gradcam", "cam", "fullgrad"):
        out = flaxcam.explain(training, images, method=method)
        assert np.isfinite(np.asarray(out.maps)).all()
    _assert_unchanged(training, snapshot)


def test_callable_targets_equal_class_targets(twins):
    linen, variables, _, images = twins
    classes = np.array([1, 4])
    expected = flaxcam.explain(linen, variables, images, layer="mid", targets=classes)
    picked = flaxcam.explain(linen, variables, images, layer="mid", targets=lambda out: out[jnp.arange(2), classes])
    np.testing.assert_allclose(np.asarray(picked.maps), np.asarray(expected.maps), atol=1e-6)
    two = flaxcam.explain(linen, variables, images, layer="mid", targets=lambda out: out[:, jnp.asarray([1, 4])])
    assert two.maps.shape[:2] == (2, 2)
    np.testing.assert_allclose(np.asarray(two.scores), np.asarray(expected.logits)[:, [1, 4]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"must return \(B,\) or \(B, T\) scores"):
        flaxcam.explain(linen, variables, images, targets=lambda out: out.sum())


def test_explain_walks_the_nnx_module_graph_once_and_then_only_when_the_model_changes(monkeypatch):
    """explain(nnx_model, images) splits the module graph (flax's Python walk: 5 ms against a 12 ms
    batch-1 Grad-CAM on EfficientNet-Lite0, benchmarks.probes.nnx_overhead) on the first call only;
    later calls read the kept split's variables and split again only when the model changed. Before:
    one split per call."""
    from flax.nnx import graphlib

    linen = UserNet()
    variables, images = _setup(linen, (2, 12, 14, 3))
    model = _twin(variables)
    calls = []
    original = graphlib.flatten
    monkeypatch.setattr(graphlib, "flatten", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = flaxcam.explain(model, images, method="cam")
    assert len(calls) == 1
    flaxcam.explain(model, images, method="gradcam", layer="mid")
    assert len(calls) == 1
    # new values in the same variables: no split, and the maps follow the new weights
    model.head.kernel[...] = -model.head.kernel[...]
    flipped = flaxcam.explain(model, images, method="cam")
    assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(flipped.logits), np.asarray(model(images)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(flipped.maps), np.asarray(first.maps))
    # another structure: split again
    model.head = nnx.Linear(16, 6, use_bias=False, rngs=nnx.Rngs(3))
    flaxcam.explain(model, images, method="cam")
    assert len(calls) == 2


class OptionalExtra(NNXUserNet):
    """NNXUserNet that runs an ``extra`` block after ``top`` once one is set."""

    def __call__(self, x):
        features = self.top(self.mid(self.stem(x)))
        if hasattr(self, "extra"):
            features = self.extra(features)
        return self.head(features.mean((1, 2)))


def test_the_fast_path_explains_the_model_as_it_is_now():
    """explain reads an NNX model's state from its last split and checks the model once the work is
    dispatched: a submodule replaced by one of the same structure (other arrays) and a new submodule
    named as the layer (unknown to the kept split) each give the maps of the model as it is now, never
    the kept split's or its layer list's."""
    _, images = _setup(UserNet(), (2, 12, 14, 3))
    model = OptionalExtra(nnx.Rngs(0))
    flaxcam.explain(model, images, method="gradcam", layer="mid")  # kept split
    model.top = Block(12, 16, 1, nnx.Rngs(11))  # same structure, other weights
    replaced = flaxcam.explain(model, images, method="gradcam", layer="top")
    fresh = flaxcam.explain(_copy_of(model), images, method="gradcam", layer="top")
    np.testing.assert_allclose(np.asarray(replaced.maps), np.asarray(fresh.maps), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(replaced.logits), np.asarray(model(images)), rtol=1e-5, atol=1e-6)
    # a layer name only the changed model has: explained, not refused with the kept split's layer list
    model.extra = Block(16, 16, 1, nnx.Rngs(12))
    extra = flaxcam.explain(model, images, method="gradcam", layer="extra")
    np.testing.assert_allclose(np.asarray(extra.logits), np.asarray(model(images)), rtol=1e-5, atol=1e-6)


def _copy_of(model: nnx.Module) -> nnx.Module:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree_util.tree_map(jnp.array, state))


class SharedConv(nnx.Module):
    """One conv module reached by two attributes (graph sharing, invisible to the pytree structure),
    called once."""

    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Conv(3, 3, (3, 3), rngs=rngs)
        self.second = self.first
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.first(x)).mean((1, 2)))


def test_a_model_with_a_shared_submodule_is_split_on_every_call(monkeypatch):
    """A submodule reached twice is one node of the graph but two of the pytree, so the cached tree
    structure cannot stand for the graph: every call splits, and the maps follow the current weights."""
    from flax.nnx import graphlib

    model = SharedConv(nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    calls = []
    original = graphlib.flatten
    monkeypatch.setattr(graphlib, "flatten", lambda *a, **k: calls.append(1) or original(*a, **k))
    flaxcam.explain(model, images, method="gradcam", layer="first")
    flaxcam.explain(model, images, method="gradcam", layer="first")
    assert len(calls) == 2
    model.first.kernel[...] = 2 * model.first.kernel[...]
    again = flaxcam.explain(model, images, method="gradcam", layer="first")
    np.testing.assert_allclose(np.asarray(again.logits), np.asarray(model(images)), rtol=1e-5, atol=1e-6)


def test_the_step_takes_the_state_or_the_list_of_its_leaves(twins):
    """``explainer(nnx_model)`` keeps the state as the plain list of its leaves (what ``explain``
    passes); the documented ``fn(nnx.state(model), images)`` gives the same maps."""
    _, _, model, images = twins
    fn = flaxcam.explainer(model, method="gradcam", layer="mid")
    assert isinstance(fn.example_variables, list)
    from_state = jax.jit(fn)(nnx.state(model), images)
    from_leaves = jax.jit(fn)(fn.example_variables, images)
    np.testing.assert_allclose(np.asarray(from_leaves.maps), np.asarray(from_state.maps), rtol=1e-6, atol=1e-7)


def test_explain_checks_an_unchanged_nnx_model_once_and_a_changed_one_again(monkeypatch):
    """The eval-mode check walks the module graph, so it runs once per graph definition of a model
    (before: on every call, about 12 ms per call on EfficientNet-Lite0). A model switched to training
    mode, or with a submodule replaced, has another definition: it is checked again and explained as
    it is now, never with a stale plan."""
    from flaxcam import plan as plan_module

    linen = UserNet()
    variables, images = _setup(linen, (2, 12, 14, 3))
    model = _twin(variables)

    checks = []
    original = plan_module.check_nnx_eval_mode
    monkeypatch.setattr(plan_module, "check_nnx_eval_mode", lambda m: checks.append(1) or original(m))
    first = flaxcam.explain(model, images, method="gradcam", layer="mid")
    flaxcam.explain(model, images, method="cam")
    assert len(checks) == 1
    # a submodule replaced by one of the same structure: the same definition (not checked again), and
    # the maps are the new weights' maps
    model.mid = Block(8, 12, 2, nnx.Rngs(7))
    changed = flaxcam.explain(model, images, method="gradcam", layer="mid")
    assert len(checks) == 1
    assert not np.allclose(np.asarray(changed.maps), np.asarray(first.maps))
    np.testing.assert_allclose(np.asarray(changed.logits), np.asarray(model(images)), rtol=1e-5, atol=1e-6)
    # one of another structure (no bias): another definition, checked again, explained as it is now
    model.mid.conv = nnx.Conv(8, 12, (3, 3), strides=2, use_bias=False, rngs=nnx.Rngs(8))
    unbiased = flaxcam.explain(model, images, method="gradcam", layer="mid")
    assert len(checks) == 2
    np.testing.assert_allclose(np.asarray(unbiased.logits), np.asarray(model(images)), rtol=1e-5, atol=1e-6)
    # eval mode is part of the definition: train() is refused on the next call, eval() explains again
    normed = WithNorm(nnx.Rngs(0))
    normed.eval()
    flaxcam.explain(normed, images)
    normed.train()
    with pytest.raises(ValueError, match="training mode"):
        flaxcam.explain(normed, images)
    normed.eval()
    assert np.isfinite(np.asarray(flaxcam.explain(normed, images).maps)).all()

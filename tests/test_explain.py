"""explain(): correctness against independent derivations, invariances, compilation and errors.

The models here are written in this file (not flaxcam's): the probe must work on any linen module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from flaxcam import pipeline, plan, step
from flaxcam.probe import LayerError, forward_at_layer, probe
from flaxcam.targets import TargetSpec, class_scores, select_classes
from tests.helpers import Block, UserNet, subprocess_env
from tests.helpers import user_net_setup as _setup


class PreActNet(nn.Module):
    """Conv → ReLU as a function → GAP → Dense: the layer output is pre-activation."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Conv(10, (3, 3), strides=2)(x)
        return nn.Dense(4)(nn.relu(x).mean((1, 2)))


def _numpy_gradcam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """float64 re-derivation: weights = spatial mean of gradients, map = sum_k w_k A_k (B, h, w)."""
    a, g = activations.astype(np.float64), gradients.astype(np.float64)
    weights = g.mean(axis=(1, 2))
    return np.einsum("bhwc,bc->bhw", a, weights)


def _numpy_normalize(m: np.ndarray) -> np.ndarray:
    m = np.maximum(m, 0)
    m = m - m.min(axis=(-2, -1), keepdims=True)
    return m / (1e-7 + m.max(axis=(-2, -1), keepdims=True))


@pytest.fixture(scope="module")
def user_net():
    model = UserNet()
    variables, images = _setup(model)
    return model, variables, images


def test_gradcam_equals_independent_derivation(user_net):
    model, variables, images = user_net
    for layer, split in (("mid", "mid"), ("top", "top")):
        explanation = flaxcam.explain(model, variables, images, method="gradcam", layer=layer)
        targets = np.asarray(explanation.targets)[:, 0]

        # Reference gradient without flaxcam's probe: run the model in two halves with linen's method=.
        def first_half(mod, x):
            h = mod.mid(mod.stem(x))
            return h if split == "mid" else mod.top(h)

        def second_half(mod, a):
            return mod.classify(a if split == "top" else mod.top(a))

        acts = model.apply(variables, images, method=first_half)
        logits = model.apply(variables, acts, method=second_half)
        assert np.array_equal(targets, np.argmax(logits, axis=1))

        def score(a):
            out = model.apply(variables, a, method=second_half)
            return jnp.take_along_axis(out, jnp.asarray(targets)[:, None], axis=1).sum()

        grads = jax.grad(score)(acts)
        expected_raw = _numpy_gradcam(np.asarray(acts), np.asarray(grads))
        np.testing.assert_allclose(np.asarray(explanation.raw)[:, 0], expected_raw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(explanation.low_res)[:, 0], _numpy_normalize(expected_raw), atol=1e-5)
        np.testing.assert_allclose(np.asarray(explanation.logits), np.asarray(logits), rtol=1e-5, atol=1e-6)


def test_gradcam_is_cam_over_hw_at_the_last_layer(user_net):
    """Identity: at the layer feeding GAP + Dense, d y_c / d A_k(x, y) = w_ck / (hw), so Grad-CAM = CAM / hw."""
    model, variables, images = user_net
    cam = flaxcam.explain(model, variables, images, method="cam", layer="top", top_k=3)
    grad = flaxcam.explain(model, variables, images, method="gradcam", layer="top", top_k=3)
    h, w = cam.raw.shape[-2:]
    np.testing.assert_array_equal(np.asarray(cam.targets), np.asarray(grad.targets))
    np.testing.assert_allclose(np.asarray(grad.raw) * h * w, np.asarray(cam.raw), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad.maps), np.asarray(cam.maps), atol=1e-4)


def test_cam_equals_numpy_head_weights(user_net):
    model, variables, images = user_net
    explanation = flaxcam.explain(model, variables, images, method="cam", targets=[0, 1, 2, 3, 4])
    acts = np.asarray(model.apply(variables, images, method=UserNet.features), np.float64)
    kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    expected = np.einsum("bhwc,cb->bhw", acts, kernel[:, [0, 1, 2, 3, 4]])
    np.testing.assert_allclose(np.asarray(explanation.raw)[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_cam_on_max_pooling_and_on_pre_activation_layers():
    gmp = UserNet(pooling="max")
    variables, images = _setup(gmp)
    out = flaxcam.explain(gmp, variables, images, method="cam")
    acts = np.asarray(gmp.apply(variables, images, method=UserNet.features), np.float64)
    kernel = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    targets = np.asarray(out.targets)[:, 0]
    np.testing.assert_allclose(
        np.asarray(out.raw)[:, 0], np.einsum("bhwc,cb->bhw", acts, kernel[:, targets]), rtol=1e-4, atol=1e-5
    )

    pre = PreActNet()
    variables, images = _setup(pre)
    out = flaxcam.explain(pre, variables, images, method="cam", layer="Conv_1")
    acts = forward_at_layer(pre, variables, images, "Conv_1")[1]
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    targets = np.asarray(out.targets)[:, 0]
    expected = np.einsum("bhwc,cb->bhw", np.maximum(np.asarray(acts, np.float64), 0), kernel[:, targets])
    np.testing.assert_allclose(np.asarray(out.raw)[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_batch_invariance_and_jit_equality(user_net):
    model, variables, images = user_net
    batched = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", top_k=2)
    for i in range(images.shape[0]):
        alone = flaxcam.explain(model, variables, images[i : i + 1], method="gradcam", layer="mid", top_k=2)
        np.testing.assert_allclose(np.asarray(alone.maps[0]), np.asarray(batched.maps[i]), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(alone.targets[0]), np.asarray(batched.targets[i]))
    with jax.disable_jit():
        eager = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", top_k=2)
    np.testing.assert_allclose(np.asarray(eager.maps), np.asarray(batched.maps), atol=1e-5)
    np.testing.assert_allclose(np.asarray(eager.raw), np.asarray(batched.raw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_constant_and_zero_images_give_no_nan(user_net, method):
    model, variables, _ = user_net
    images = jnp.stack([jnp.zeros((18, 22, 3)), jnp.full((18, 22, 3), 0.7), jnp.full((18, 22, 3), -3.0)])
    out = flaxcam.explain(model, variables, images, method=method)
    for field in (out.maps, out.low_res, out.probabilities):
        assert np.isfinite(np.asarray(field)).all()
    maps = np.asarray(out.maps)
    assert maps.min() >= 0 and maps.max() <= 1


def test_ragged_batches_reuse_one_program(user_net):
    model, variables, images = user_net
    images = jnp.concatenate([images, images])  # 10 images
    flaxcam.explain(model, variables, images[:5], method="gradcam", layer="mid")  # bucket 8
    before = step.TRACE_COUNT
    results = [flaxcam.explain(model, variables, images[:n], method="gradcam", layer="mid") for n in (6, 7, 8, 5)]
    assert before == step.TRACE_COUNT, "a ragged batch size compiled a new program"
    assert [r.maps.shape[0] for r in results] == [6, 7, 8, 5]
    flaxcam.explain(model, variables, images[:9], method="gradcam", layer="mid")  # bucket 16: one new trace
    assert before + 1 == step.TRACE_COUNT


def test_repeated_calls_trace_the_model_for_shapes_only_once(user_net):
    """Per-call host work stays small: the layer listing (an eval_shape trace of the whole model) is
    cached by the variables' structure and shapes, and new weights of the same shapes reuse it."""
    from flaxcam import capture

    model, variables, images = user_net
    flaxcam.explain(model, variables, images, method="cam", layer="top")
    misses = capture._linen_layers.cache_info().misses
    other_weights = jax.tree_util.tree_map(lambda p: np.asarray(p) * 2.0, variables)  # NumPy leaves, same shapes
    flaxcam.explain(model, other_weights, images, method="cam", layer="top")
    flaxcam.explain(model, variables, images, method="gradcam", layer="mid")
    assert capture._linen_layers.cache_info().misses == misses


def test_shape_key_canonicalizes_dtypes_and_tells_structures_apart():
    from flaxcam.probe import shape_key

    as_jax = {"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}
    as_numpy64 = {"params": {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float64)}}
    assert shape_key(as_jax) == shape_key(as_numpy64)  # float64 is float32 without x64, as in jit
    assert hash(shape_key(as_jax)) == hash(shape_key(as_numpy64))
    assert shape_key(as_jax) != shape_key({"params": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)}})
    assert shape_key(as_jax) != shape_key({"params": {"w": jnp.zeros((2, 3)), "c": jnp.zeros(3)}})
    assert shape_key(as_jax) != shape_key({"params": {"w": jnp.zeros((2, 3), jnp.int32), "b": jnp.zeros(3)}})
    assert shape_key(shape_key(as_jax)) == shape_key(as_jax)
    tree = shape_key(as_numpy64).tree
    assert tree["params"]["w"] == jax.ShapeDtypeStruct((2, 3), jnp.float32)


def test_variables_already_on_the_one_device_are_not_copied_again():
    device = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.asarray([device]), ("batch",))
    on_device = {"w": jnp.ones(3)}
    assert pipeline._placed_variables(on_device, mesh) is on_device
    from_host = pipeline._placed_variables({"w": np.ones(3, np.float32)}, mesh)
    assert isinstance(from_host["w"], jax.Array) and from_host["w"].sharding.device_set == {device}


def test_bucket_sizes():
    assert [flaxcam.bucket_size(n) for n in (1, 2, 3, 5, 16, 17, 256, 257)] == [1, 2, 4, 8, 16, 32, 256, 512]
    assert flaxcam.bucket_size(3, multiple_of=4) == 4 and flaxcam.bucket_size(1, multiple_of=4) == 4
    assert flaxcam.bucket_size(9, multiple_of=3) == 18


def test_targets_explicit_and_top_k(user_net):
    model, variables, images = user_net
    top = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", top_k=3)
    expected_top = np.argsort(-np.asarray(top.logits), axis=1)[:, :3]
    np.testing.assert_array_equal(np.asarray(top.targets), expected_top)
    explicit = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", targets=expected_top)
    np.testing.assert_allclose(np.asarray(explicit.maps), np.asarray(top.maps), atol=1e-5)
    # different per-image targets give different maps and the requested classes
    per_image = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", targets=[5, 4, 3, 2, 1])
    assert np.asarray(per_image.targets)[:, 0].tolist() == [5, 4, 3, 2, 1]
    np.testing.assert_allclose(
        np.asarray(per_image.scores)[:, 0], np.asarray(per_image.logits)[np.arange(5), [5, 4, 3, 2, 1]], rtol=1e-6
    )
    same = flaxcam.explain(model, variables, images, method="gradcam", layer="mid", targets=2)
    assert (np.asarray(same.targets) == 2).all()


def test_error_messages(user_net):
    model, variables, images = user_net
    with pytest.raises(LayerError, match=r"unknown layer 'nope'.*stem.*mid.*top"):
        flaxcam.explain(model, variables, images, layer="nope")
    with pytest.raises(LayerError, match=r"outputs shape .* not \(batch, height, width, channels\).*top"):
        flaxcam.explain(model, variables, images, layer="head")
    with pytest.raises(
        ValueError, match=r"unknown method 'gradcamm'; available: ablationcam, cam, .*gradcam, .*layercam"
    ):
        flaxcam.explain(model, variables, images, method="gradcamm")
    with pytest.raises(LayerError, match=r"CAM needs the layer that feeds global pooling.*12 channels.*'top'"):
        flaxcam.explain(model, variables, images, method="cam", layer="mid")
    with pytest.raises(ValueError, match=r"target classes must be in \[0, 6\)"):
        flaxcam.explain(model, variables, images, targets=[0, 1, 2, 3, 6])
    with pytest.raises(ValueError, match=r"5 ints \(one per image\)"):
        flaxcam.explain(model, variables, images, targets=[0, 1])
    with pytest.raises(ValueError, match="either targets= or top_k="):
        flaxcam.explain(model, variables, images, targets=1, top_k=2)
    with pytest.raises(ValueError, match=r"top_k must be an int between 1 and the number of classes \(6\)"):
        flaxcam.explain(model, variables, images, top_k=7)
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\).*add a batch axis"):
        flaxcam.explain(model, variables, images[0])
    with pytest.raises(ValueError, match="floating point"):
        flaxcam.explain(model, variables, np.zeros((2, 18, 22, 3), np.uint8))


class ScaledHead(nn.Module):
    """GAP features scaled before the Dense: CAM's head check must refuse it."""

    @nn.compact
    def __call__(self, x):
        x = Block(8, name="block")(x)
        return nn.Dense(3, name="fc")(2.0 * x.mean((1, 2)) + 1.0)


class NoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(4, name="block")(x).mean((1, 2))


def test_cam_head_errors():
    model = ScaledHead()
    variables, images = _setup(model, (2, 12, 12, 3))
    with pytest.raises(LayerError, match=r"input of head 'fc' is neither the global average or max"):
        flaxcam.explain(model, variables, images, method="cam")
    flaxcam.explain(model, variables, images, method="gradcam")  # gradient methods still work
    model = NoDense()
    variables, images = _setup(model, (2, 12, 12, 3))
    with pytest.raises(LayerError, match="calls no nn.Dense"):
        flaxcam.explain(model, variables, images, method="cam")


def test_non_square_inputs_give_maps_at_input_size(user_net):
    model, variables, _ = user_net
    images = jax.random.normal(jax.random.key(3), (2, 45, 60, 3))
    out = flaxcam.explain(model, variables, images, method="gradcam")
    assert out.maps.shape == (2, 1, 45, 60)
    assert out.low_res.shape == (2, 1, 23, 30)


def _count_convs(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            count += 1
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                count += _count_convs(getattr(inner, "jaxpr", inner))
    return count


def test_backward_pass_stops_at_the_layer(user_net):
    """The gradient is taken only from the targets back to the layer: no conv before it is transposed."""
    model, variables, images = user_net
    spec = TargetSpec("argmax")

    def score_fn(logits):
        chosen = select_classes(spec, logits, None)
        return class_scores(logits, chosen), chosen

    def run(layer, with_gradients):
        return probe(model, variables, images, layer, score_fn, with_gradients=with_gradients)[:3]

    forward_convs = _count_convs(jax.make_jaxpr(lambda: run("top", False))().jaxpr)
    assert forward_convs == 3
    # at "top" the backward pass is GAP + Dense only: no extra convolution at all
    assert _count_convs(jax.make_jaxpr(lambda: run("top", True))().jaxpr) == forward_convs
    # at "mid" it goes back through "top"'s conv only (one transposed conv, no weight gradient)
    assert _count_convs(jax.make_jaxpr(lambda: run("mid", True))().jaxpr) == forward_convs + 1


SHARDING_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    import flaxcam
    from tests.helpers import UserNet, user_net_setup
    assert len(jax.devices()) == 4, jax.devices()
    model = UserNet()
    variables, images = user_net_setup(model, (7, 18, 22, 3))
    for method in ("gradcam", "cam"):
        sharded = flaxcam.explain(model, variables, images, method=method, top_k=2)
        assert len(sharded.maps.sharding.device_set) == 4, sharded.maps.sharding
        single = flaxcam.explain(model, variables, images, method=method, top_k=2, devices=jax.devices()[:1])
        assert len(single.maps.sharding.device_set) == 1
        np.testing.assert_allclose(np.asarray(sharded.maps), np.asarray(single.maps), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(sharded.targets), np.asarray(single.targets))
    print("sharded-ok")
    """
)


def test_sharded_over_four_devices_equals_one_device(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDING_SCRIPT.format())
    env = subprocess_env()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded-ok" in result.stdout


def test_cam_head_check_runs_once_per_architecture(user_net):
    """Rebuilding the variables dict (as a training loop does) must not repeat the head check."""
    model, variables, images = user_net
    flaxcam.explain(model, dict(variables), images, method="cam")
    checks = len(plan._HEAD_FEATURES)
    shifted = jax.tree_util.tree_map(lambda p: p * 1.01, variables)  # new weights, same structure
    flaxcam.explain(model, shifted, images, method="cam")
    flaxcam.explain(model, dict(variables), images, method="cam")
    assert len(plan._HEAD_FEATURES) == checks


def test_cam_head_check_is_one_compiled_forward_pass() -> None:
    """Outside a trace the head check compiles the forward pass once; it must not evaluate flax's
    parameter-shape checks op by op (one compilation per parameter: half a minute for EfficientNet-Lite0
    on a CPU). Inside a trace (an explainer under the user's jit, weights closed over) it still works."""
    model = UserNet(num_classes=5)
    images = jax.random.normal(jax.random.key(1), (2, 17, 19, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images)  # no eager initializers compiled here
    compiles: list[str] = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        spec = jax.ShapeDtypeStruct(images.shape, images.dtype)
        assert plan._head_features(model, variables, "top", "head", spec) == "identity"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    parameters = len(jax.tree_util.tree_leaves(variables))
    assert len(compiles) <= 2 < parameters, compiles  # the forward pass (and the random test images)

    small = UserNet(num_classes=4)
    closed = jax.jit(small.init)(jax.random.key(2), images)
    fn = flaxcam.explainer(small, method="cam", layer="top")
    traced = jax.jit(lambda x: fn(closed, x).maps)(images)  # planned while tracing, weights concrete
    eager = flaxcam.explain(small, closed, images, method="cam").maps
    np.testing.assert_allclose(np.asarray(traced), np.asarray(eager), atol=1e-5)

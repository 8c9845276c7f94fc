"""flaxcam.models: shapes, names, pooling, registry, bundles and the torchvision weight converter (torch-free)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcam import models
from flaxcam.models import (
    MODELS,
    NON_POOLING_MODELS,
    create_model,
    init_variables,
    load_bundle,
    load_torchvision_resnet,
    save_bundle,
)
from flaxcam.models.resnet import BasicBlock, Bottleneck

SHAPE = (2, 96, 128, 3)  # non-square on purpose


def _images(shape=SHAPE, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.fixture(scope="module")
def resnet18_vars():
    model = models.resnet18(num_classes=5)
    return model, init_variables(model, (1, 64, 64, 3))


@pytest.fixture(scope="module")
def small_vars():
    model = models.small_cnn(num_classes=4)
    return model, init_variables(model, (1, 64, 64, 3))


# -- shapes, registry, pooling ------------------------------------------------------------------------


def test_registry_keys():
    assert set(MODELS) == {
        "resnet18",
        "resnet34",
        "resnet50",
        "vgg16",
        "small_cnn",
        "efficientnet_lite0",
        "fcn_resnet18",
        "tiny_vit",
    }
    assert set(MODELS) >= NON_POOLING_MODELS


@pytest.mark.parametrize("name", sorted(set(MODELS) - NON_POOLING_MODELS))
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_output_shapes(name, pooling):
    model = create_model(name, num_classes=7, pooling=pooling)
    x = jnp.zeros(SHAPE)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, 7)
    assert ("batch_stats" in variables) == (name.startswith(("resnet", "efficientnet")))


def test_fcn_and_vit_output_shapes():
    fcn = create_model("fcn_resnet18", num_classes=4)
    x = jnp.zeros(SHAPE)
    variables = jax.eval_shape(lambda: fcn.init(jax.random.key(0), x, train=False))
    assert jax.eval_shape(lambda v: fcn.apply(v, x, train=False), variables).shape == (2, 96, 128, 4)  # per pixel
    assert "batch_stats" in variables and set(variables["params"]) == {"backbone", "classifier"}
    vit = create_model("tiny_vit", num_classes=7, image_size=SHAPE[1:3])
    variables = jax.eval_shape(lambda: vit.init(jax.random.key(0), x, train=False))
    assert jax.eval_shape(lambda v: vit.apply(v, x, train=False), variables).shape == (2, 7)
    assert variables["params"]["position"].shape == (1, 1 + 6 * 8, 64)  # 96x128 in 16x16 patches


def test_small_cnn_runs(small_vars):
    model, variables = small_vars
    out = model.apply(variables, _images())
    assert out.shape == (2, 4) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_resnet18_train_mode_updates_batch_stats(resnet18_vars):
    model, variables = resnet18_vars
    out, updates = model.apply(variables, _images((2, 32, 32, 3)), train=True, mutable=["batch_stats"])
    assert out.shape == (2, 5)
    before = variables["batch_stats"]["bn1"]["mean"]
    after = updates["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(before, after)


@pytest.mark.parametrize("fixture", ["small_vars", "resnet18_vars"])
def test_pooling_avg_vs_max_differs(fixture, request):
    model, variables = request.getfixturevalue(fixture)
    x = _images((2, 64, 64, 3))
    avg = model.apply(variables, x)
    gmp = model.clone(pooling="max").apply(variables, x)
    assert avg.shape == gmp.shape
    assert not np.allclose(avg, gmp)


@pytest.mark.parametrize(
    "constructor", [models.resnet18, models.resnet34, models.resnet50, models.vgg16, models.small_cnn]
)
def test_invalid_pooling(constructor):
    with pytest.raises(ValueError, match="'avg'.*'max'"):
        constructor(pooling="sum")


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="resnet18.*small_cnn|small_cnn.*resnet18") as err:
        create_model("resnet9000")
    assert "vgg16" in str(err.value) and "resnet9000" in str(err.value)


def test_create_model_kwargs():
    model = create_model("small_cnn", num_classes=3, features=[8, 16])
    assert model.features == (8, 16) and model.num_classes == 3


# -- module names -------------------------------------------------------------------------------------


def _called_paths(model, x):
    paths = set()

    def record(next_fun, args, kwargs, context):
        paths.add(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, x), variables)
    return paths


def test_resnet18_module_names():
    paths = _called_paths(models.resnet18(), jnp.zeros((1, 64, 64, 3)))
    for expected in [
        ("conv1",),
        ("bn1",),
        ("layer1",),
        ("layer1", "0", "conv1"),
        ("layer2", "0", "downsample", "0"),
        ("layer2", "0", "downsample", "1"),
        ("layer3",),
        ("layer3", "1"),
        ("layer3", "1", "conv2"),
        ("layer3", "1", "bn2"),
        ("layer4",),
        ("fc",),
    ]:
        assert expected in paths, expected
    assert ("layer1", "0", "downsample") not in paths  # ResNet-18's layer1 has no projection
    assert not any(p and p[-1] in ("conv3", "bn3") for p in paths)


def test_resnet50_module_names():
    paths = _called_paths(models.resnet50(), jnp.zeros((1, 64, 64, 3)))
    for expected in [("layer1", "0", "downsample", "0"), ("layer3", "5", "conv3"), ("layer4", "2", "bn3"), ("fc",)]:
        assert expected in paths, expected
    assert ("layer3", "6") not in paths


def test_vgg16_module_names():
    paths = _called_paths(models.vgg16(), jnp.zeros((1, 64, 64, 3)))
    convs = {p for p in paths if len(p) == 1 and p[0].startswith("block")}
    assert len(convs) == 13
    assert ("block1_conv1",) in paths and ("block5_conv3",) in paths and ("fc",) in paths


def test_small_cnn_module_names():
    paths = _called_paths(models.small_cnn(features=(8, 8, 8, 8)), jnp.zeros((1, 64, 64, 3)))
    assert {("conv1",), ("conv2",), ("conv3",), ("conv4",), ("fc",)} <= paths


def _np_conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Float64 'same' convolution (odd kernel, stride 1, zero padding) of NHWC ``x`` by HWIO ``kernel``."""
    size = kernel.shape[0]
    pad = size // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for dy in range(size):
        for dx in range(size):
            out += np.einsum("nhwc,co->nhwo", padded[:, dy : dy + height, dx : dx + width], kernel[dy, dx])
    return out + bias


def test_small_cnn_kernel_sizes_match_a_numpy_forward():
    """``kernel_sizes``: parameter shapes and names, and the logits equal a float64 NumPy forward pass
    written from the definitions."""
    model = models.small_cnn(num_classes=3, features=(8, 12, 16), downsamplings=1, kernel_sizes=(3, 1, 5))
    x = np.asarray(_images((2, 10, 14, 3), seed=3), np.float64)
    variables = model.init(jax.random.key(1), jnp.asarray(x, jnp.float32))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert set(params) == {"conv1", "conv2", "conv3", "fc"}
    assert params["conv2"]["kernel"].shape == (1, 1, 8, 12) and params["conv3"]["kernel"].shape == (5, 5, 12, 16)
    # non-zero biases, so the test sees whether they are applied
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)

    def relu(a):
        return np.maximum(a, 0.0)

    h = relu(_np_conv_same(x, **params["conv1"]))
    h = h.reshape(2, 5, 2, 7, 2, 8).max(axis=(2, 4))  # 2x2 max-pool
    h = relu(_np_conv_same(h, **params["conv2"]))
    h = relu(_np_conv_same(h, **params["conv3"]))
    expected = h.mean(axis=(1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]
    got = model.apply(
        {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}, jnp.asarray(x, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_small_cnn_reference_class_logit_stays_zero_through_adamw_and_cam_still_holds():
    """``reference_class=True``: the last logit is 0 for every input, the last ``fc`` column and bias start
    at 0 and stay exactly 0 through AdamW steps with weight decay (while the other columns move), the
    logits match a float64 NumPy forward pass, and CAM's identity ``logit = mean(CAM) + bias`` holds for
    every class, the reference class included (its map is 0)."""
    import optax

    import flaxcam

    model = models.small_cnn(num_classes=4, features=(6, 8), downsamplings=1, reference_class=True)
    x = jnp.asarray(_images((6, 12, 10, 3), seed=5))
    labels = jnp.array([0, 1, 2, 3, 3, 1])
    variables = model.init(jax.random.key(3), x)
    before = np.asarray(variables["params"]["fc"]["kernel"])
    assert np.all(before[:, -1] == 0) and np.all(np.asarray(variables["params"]["fc"]["bias"]) == 0)
    assert np.abs(before[:, :-1]).min() > 0

    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    state = optimizer.init(variables["params"])

    def loss(params):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), labels).mean()

    params = variables["params"]
    for _ in range(3):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    kernel, bias = np.asarray(params["fc"]["kernel"]), np.asarray(params["fc"]["bias"])
    assert np.all(kernel[:, -1] == 0) and bias[-1] == 0
    assert np.abs(kernel[:, :-1] - before[:, :-1]).min() > 0 and np.all(bias[:-1] != 0)

    variables = {"params": params}
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = np.asarray(x, np.float64)
    h = np.maximum(_np_conv_same(x64, **p64["conv1"]), 0.0).reshape(6, 6, 2, 5, 2, 6).max(axis=(2, 4))
    features = np.maximum(_np_conv_same(h, **p64["conv2"]), 0.0)
    expected = features.mean(axis=(1, 2)) @ p64["fc"]["kernel"][:, :-1] + p64["fc"]["bias"][:-1]
    expected = np.concatenate([expected, np.zeros((6, 1))], axis=1)
    logits = np.asarray(model.apply(variables, x))
    assert np.all(logits[:, -1] == 0)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)

    for target in range(4):
        explanation = flaxcam.explain(model, variables, x, method="cam", targets=np.full(6, target))
        raw = np.asarray(explanation.raw[:, 0], np.float64)
        np.testing.assert_allclose(
            raw.mean(axis=(1, 2)) + p64["fc"]["bias"][target], expected[:, target], rtol=1e-4, atol=1e-5
        )
        if target == 3:
            assert np.all(raw == 0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        models.small_cnn(num_classes=1, reference_class=True)


def test_small_cnn_defaults_unchanged_and_option_errors():
    params = init_variables(models.small_cnn(features=(4, 8)), (1, 16, 16, 3))["params"]
    assert set(params) == {"conv1", "conv2", "fc"} and params["conv2"]["kernel"].shape == (3, 3, 4, 8)
    with pytest.raises(ValueError, match="one size per conv"):
        models.small_cnn(features=(4, 8), kernel_sizes=(3,))
    with pytest.raises(ValueError, match="odd"):
        models.small_cnn(features=(4, 8), kernel_sizes=(3, 2))


def test_last_spatial_features_are_module_outputs():
    """CAM targets: the output of layer4 / block5_conv3 / conv3 keeps its spatial axes (pooling is a function)."""
    cases = [
        (models.resnet18(), ("layer4",), (1, 3, 4, 512)),
        (models.vgg16(), ("block5_conv3",), (1, 6, 8, 512)),
        (models.small_cnn(), ("conv3",), (1, 24, 32, 64)),
    ]
    for model, path, shape in cases:
        x = jnp.zeros((1, 96, 128, 3))
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
        _, state = jax.eval_shape(
            lambda v, m=model: m.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables
        )
        node = state["intermediates"]
        for name in path:
            node = node[name]
        assert node["__call__"][0].shape == shape


# -- bundles ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,fixture",
    [
        ("small_cnn", {"num_classes": 4}, "small_vars"),
        ("resnet18", {"num_classes": 5, "pooling": "avg"}, "resnet18_vars"),
    ],
)
def test_bundle_round_trip(tmp_path, request, name, kwargs, fixture):
    model, variables = request.getfixturevalue(fixture)
    meta = {
        "class_names": ["a", "b", "c", "d"],
        "input_size": (64, 64),
        "mean": np.array([0.485, 0.456, 0.406], np.float32),
        "std": (0.229, 0.224, 0.225),
        "note": None,
    }
    path = tmp_path / "model.msgpack"
    save_bundle(path, model_name=name, model_kwargs=kwargs, variables=variables, meta=meta)
    loaded_model, loaded_vars, loaded_meta = load_bundle(path)
    assert type(loaded_model) is type(model) and loaded_model.num_classes == model.num_classes
    x = _images((2, 64, 64, 3), seed=3)
    np.testing.assert_array_equal(model.apply(variables, x), loaded_model.apply(loaded_vars, x))
    assert loaded_meta["class_names"] == ("a", "b", "c", "d")
    assert loaded_meta["input_size"] == (64, 64)
    assert loaded_meta["std"] == (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(loaded_meta["mean"], meta["mean"])
    assert loaded_meta["note"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["model.msgpack"]  # no temp file left behind


def test_bundle_tuple_kwargs_and_no_meta(tmp_path):
    model = models.small_cnn(num_classes=3, features=(4, 8))
    variables = init_variables(model, (1, 32, 32, 3))
    path = tmp_path / "b.msgpack"
    save_bundle(path, model_name="small_cnn", model_kwargs={"num_classes": 3, "features": (4, 8)}, variables=variables)
    loaded, loaded_vars, meta = load_bundle(str(path))
    assert loaded.features == (4, 8) and meta == {}
    jax.tree.map(np.testing.assert_array_equal, variables, loaded_vars)


def test_bundle_errors(tmp_path, small_vars):
    _, variables = small_vars
    missing = tmp_path / "nope.msgpack"
    with pytest.raises(FileNotFoundError, match="nope.msgpack"):
        load_bundle(missing)

    corrupt = tmp_path / "corrupt.msgpack"
    corrupt.write_bytes(b"\xc1\x00this is not msgpack" * 10)
    with pytest.raises(ValueError, match="corrupt.msgpack"):
        load_bundle(corrupt)

    good = tmp_path / "good.msgpack"
    save_bundle(good, model_name="small_cnn", model_kwargs={"num_classes": 4}, variables=variables)
    truncated = tmp_path / "truncated.msgpack"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.msgpack"):
        load_bundle(truncated)

    from flax import serialization

    wrong = tmp_path / "wrong.msgpack"
    wrong.write_bytes(serialization.msgpack_serialize({"hello": 1}))
    with pytest.raises(ValueError, match="wrong.msgpack"):
        load_bundle(wrong)

    with pytest.raises(ValueError, match="unknown model"):
        save_bundle(tmp_path / "x", model_name="alexnet", model_kwargs={}, variables=variables)
    with pytest.raises(TypeError, match="model_kwargs.dtype"):
        save_bundle(tmp_path / "x", model_name="small_cnn", model_kwargs={"dtype": object()}, variables=variables)
    assert not (tmp_path / "x").exists()


# -- torchvision state_dict conversion (numpy only) ---------------------------------------------------


def _to_torch_state_dict(variables):
    """Inverse mapping, written independently of flaxcam.models.convert: flax variables -> torch keys/layouts."""
    state = {}

    def walk(tree, prefix, collection):
        for name, value in tree.items():
            if isinstance(value, dict):
                walk(value, [*prefix, name], collection)
                continue
            array = np.asarray(value)
            key = ".".join(prefix)
            if collection == "params":
                if name == "kernel" and array.ndim == 4:
                    state[f"{key}.weight"] = np.ascontiguousarray(array.transpose(3, 2, 0, 1))
                elif name == "kernel":
                    state[f"{key}.weight"] = np.ascontiguousarray(array.T)
                elif name == "scale":
                    state[f"{key}.weight"] = array
                else:
                    state[f"{key}.{name}"] = array
            else:
                state[f"{key}.{ {'mean': 'running_mean', 'var': 'running_var'}[name] }"] = array
                state[f"{key}.num_batches_tracked"] = np.array(7)

    walk(variables["params"], [], "params")
    walk(variables["batch_stats"], [], "batch_stats")
    return state


def _randomize_batch_stats(variables, seed=1):
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


class _FakeTensor:
    """Duck-typed stand-in for a torch tensor: ``.detach().cpu().numpy()``."""

    def __init__(self, array):
        self.array = array

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


@pytest.fixture(scope="module")
def resnet18_state(resnet18_vars):
    _, variables = resnet18_vars
    variables = _randomize_batch_stats(variables)
    return variables, _to_torch_state_dict(variables)


def test_state_dict_keys_look_like_torchvision(resnet18_state):
    _, state = resnet18_state
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer3.1.conv2.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in state, key
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["fc.weight"].shape == (5, 512)
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 122 - 20  # resnet18: 102 tensors


@pytest.mark.parametrize("wrap", [False, True])
def test_load_torchvision_resnet_round_trip(resnet18_vars, resnet18_state, wrap):
    model, _ = resnet18_vars
    variables, state = resnet18_state
    if wrap:
        state = {k: _FakeTensor(v) for k, v in state.items()}
    loaded_model, loaded = load_torchvision_resnet(state)
    assert loaded_model.num_classes == 5 and loaded_model.block_cls is BasicBlock
    assert tuple(loaded_model.stage_sizes) == (2, 2, 2, 2)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))
    x = _images((1, 64, 64, 3))
    np.testing.assert_array_equal(model.apply(variables, x), loaded_model.apply(loaded, x))


def test_load_torchvision_resnet_max_pooling(resnet18_state):
    _variables, state = resnet18_state
    model, _loaded = load_torchvision_resnet(state, pooling="max")
    assert model.pooling == "max"
    with pytest.raises(ValueError, match="'avg'"):
        load_torchvision_resnet(state, pooling="mean")


@pytest.mark.parametrize(
    "constructor,stage_sizes,block_cls",
    [(models.resnet34, (3, 4, 6, 3), BasicBlock), (models.resnet50, (3, 4, 6, 3), Bottleneck)],
)
def test_load_torchvision_resnet_infers_architecture(constructor, stage_sizes, block_cls):
    model = constructor(num_classes=11)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    # Zero-stride views: no memory for the (large) weights.
    fake = jax.tree.map(lambda s: np.broadcast_to(np.float32(0.5), s.shape), shapes)
    loaded_model, loaded = load_torchvision_resnet(_to_torch_state_dict(fake))
    assert loaded_model.num_classes == 11
    assert tuple(loaded_model.stage_sizes) == stage_sizes and loaded_model.block_cls is block_cls
    assert jax.tree.map(lambda a: a.shape, loaded) == jax.tree.map(lambda s: s.shape, shapes)


def test_load_torchvision_resnet_missing_key(resnet18_state):
    _, state = resnet18_state
    state = dict(state)
    del state["layer3.1.bn2.running_mean"], state["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing") as err:
        load_torchvision_resnet(state)
    assert "layer3.1.bn2.running_mean" in str(err.value) and "layer1.0.conv1.weight" in str(err.value)


def test_load_torchvision_resnet_missing_fc(resnet18_state):
    _, state = resnet18_state
    state = {k: v for k, v in state.items() if k != "fc.weight"}
    with pytest.raises(ValueError, match="fc.weight"):
        load_torchvision_resnet(state)


def test_load_torchvision_resnet_unexpected_key(resnet18_state):
    _, state = resnet18_state
    state = dict(state)
    state["layer1.0.conv9.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    state["layer2.0.bn1.foo"] = np.zeros((128,), np.float32)
    with pytest.raises(ValueError, match="unexpected") as err:
        load_torchvision_resnet(state)
    assert "layer1.0.conv9.weight" in str(err.value) and "layer2.0.bn1.foo" in str(err.value)
    assert "missing" not in str(err.value)


def test_load_torchvision_resnet_shape_mismatch(resnet18_state):
    _, state = resnet18_state
    state = dict(state)
    state["layer2.1.conv1.weight"] = np.zeros((128, 128, 1, 1), np.float32)
    state["fc.bias"] = np.zeros((6,), np.float32)
    with pytest.raises(ValueError, match="shape") as err:
        load_torchvision_resnet(state)
    message = str(err.value)
    assert "layer2.1.conv1.weight" in message and "fc.bias" in message and "missing" not in message


def test_load_torchvision_resnet_not_a_resnet():
    with pytest.raises(ValueError, match="layer1..layer4"):
        load_torchvision_resnet({"fc.weight": np.zeros((3, 8)), "features.0.weight": np.zeros((8, 3, 3, 3))})

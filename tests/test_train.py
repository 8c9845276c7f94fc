"""flaxcam.train: augmentation, resume after interruption (same final parameters), bundle -> explain."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import pytest
from PIL import Image

from flaxcam import train as T
from flaxcam.data import make_digit_canvases

SIZE = (32, 32)


def _config(**overrides) -> T.TrainConfig:
    values: dict[str, Any] = {
        "model": "small_cnn",
        "model_kwargs": {"features": [4, 8]},
        "input_size": SIZE,
        "epochs": 2,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "flip": True,
        "shift": 2,
        "checkpoint_every": 4,
        "seed": 5,
    }
    values.update(overrides)
    return T.TrainConfig(**values)


@pytest.fixture(scope="module")
def digits():
    data = make_digit_canvases(100, size=SIZE, digit_size=(10, 20), clutter_lines=1, seed=2)
    return data


def _feed(data, config):
    return T.ArrayFeed.from_images(data.images, data.labels, data.class_names, config)


class _InterruptingFeed:
    """Wraps a feed and raises KeyboardInterrupt (as Ctrl-C would) when batch number ``at`` is requested."""

    def __init__(self, feed, at: int):
        self.feed, self.at, self.served = feed, at, 0
        self.class_names = feed.class_names

    def __len__(self):
        return len(self.feed)

    def batches(self, order, batch_size):
        for batch in self.feed.batches(order, batch_size):
            if self.served == self.at:
                raise KeyboardInterrupt
            self.served += 1
            yield batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_interrupted_run_resumes_to_the_same_parameters(digits, tmp_path):
    """Ctrl-C in the middle of epoch 2 (step 9 of 12), then the same call again: the resumed run restores
    the state of the last checkpoint (step 8), replays the same batches and augmentations (flips and
    shifts), and ends with exactly the parameters and optimizer state of an uninterrupted run."""
    config = _config()
    full = T.train(config, _feed(digits, config), out=tmp_path / "full", progress=False, log=lambda _: None)
    assert full.steps == 12 and full.resumed_from is None  # 100 // 16 = 6 steps per epoch

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        T.train(config, _InterruptingFeed(_feed(digits, config), at=9), out=out, progress=False, log=lambda _: None)
    assert not (out / "model.msgpack").exists()
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == 9  # the interrupt handler checkpointed the last completed step

    resumed = T.train(config, _feed(digits, config), out=out, progress=False, log=lambda _: None)
    assert resumed.resumed_from == 9 and resumed.steps == 12
    for a, b in zip(_leaves(full.variables), _leaves(resumed.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [h["step"] for h in resumed.history] == [6, 12]
    # and the run did learn something different from its initialisation
    init = T.create_train_state(
        full.model, T.make_optimizer(config, 12), (1, *SIZE, 3), jax.random.key(config.seed, impl="rbg")
    )
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(init.params), _leaves(full.variables["params"])))


def test_stop_after_step_then_resume_and_config_mismatch(digits, tmp_path):
    config = _config(epochs=2, checkpoint_every=0)
    first = T.train(config, _feed(digits, config), out=tmp_path, progress=False, stop_after_step=2, log=lambda _: None)
    assert first.steps == 2 and not first.history
    at_epoch_end = T.train(
        config, _feed(digits, config), out=tmp_path, progress=False, stop_after_step=6, log=lambda _: None
    )
    assert (
        at_epoch_end.resumed_from == 2 and at_epoch_end.steps == 6 and [h["step"] for h in at_epoch_end.history] == [6]
    )
    with pytest.raises(ValueError, match=r"differs in \['learning_rate'\]"):
        T.train(
            _config(epochs=2, checkpoint_every=0, learning_rate=1.0),
            _feed(digits, config),
            out=tmp_path,
            progress=False,
        )
    second = T.train(config, _feed(digits, config), out=tmp_path, progress=False, log=lambda _: None)
    assert second.resumed_from == 6 and second.steps == 12 and [h["step"] for h in second.history] == [6, 12]
    restarted = T.train(config, _feed(digits, config), out=tmp_path, progress=False, resume=False, log=lambda _: None)
    assert restarted.resumed_from is None and restarted.steps == 12


def test_augment_gives_edge_padded_shifts_and_flips():
    rng = np.random.default_rng(0)
    images = rng.random((16, 6, 7, 3)).astype(np.float32)
    shift = 2
    flips, offsets = T.augmentation_draws(0, 3, len(images), flip=True, shift=shift)
    assert np.all((offsets >= 0) & (offsets <= 2 * shift)) and len(np.unique(offsets, axis=0)) > 4
    out = np.asarray(T.augment(images, flips, offsets, shift))
    flipped_count = 0
    for image, result, flip, offset in zip(images, out, flips, offsets):
        candidates = []
        for flipped, source in ((False, image), (True, image[:, ::-1])):
            padded = np.pad(source, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
            for dy in range(2 * shift + 1):
                for dx in range(2 * shift + 1):
                    if np.array_equal(padded[dy : dy + 6, dx : dx + 7], result):
                        candidates.append((flipped, dy, dx))
        assert (bool(flip), *offset) in candidates, "output is not the drawn flip/shift of its input"
        flipped_count += bool(flip)
    assert 0 < flipped_count < len(images)
    none = T.augmentation_draws(0, 3, len(images), flip=False, shift=0)
    np.testing.assert_array_equal(np.asarray(T.augment(images, *none, 0)), images)  # nothing enabled


def test_run_saved_before_new_config_keys_still_resumes(digits, tmp_path):
    """A run whose config.json lacks keys added since resumes with their defaults."""
    config = _config(epochs=1, checkpoint_every=0)
    T.train(config, _feed(digits, config), out=tmp_path, progress=False, stop_after_step=2, log=lambda _: None)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "warmup_fraction"}))
    resumed = T.train(config, _feed(digits, config), out=tmp_path, progress=False, log=lambda _: None)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    with pytest.raises(ValueError, match=r"differs in \['shift'\]"):
        T.train(_config(epochs=1, checkpoint_every=0, shift=1), _feed(digits, config), out=tmp_path, progress=False)


def test_run_saved_with_removed_options_off_still_resumes(digits, tmp_path):
    """Hide-and-Seek and the one-vs-rest loss were removed: a config.json that has their keys at the "off"
    value (every run saved while they existed) resumes; one that used them is refused, naming the key."""
    config = _config(epochs=1, checkpoint_every=0)
    T.train(config, _feed(digits, config), out=tmp_path, progress=False, stop_after_step=2, log=lambda _: None)
    saved = json.loads((tmp_path / "config.json").read_text())
    old = {**saved, "hide_patch": 0, "hide_probability": 0.5, "loss": "softmax"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert T.TrainConfig.from_dict(old) == config
    resumed = T.train(config, _feed(digits, config), out=tmp_path, progress=False, log=lambda _: None)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    for key, value in (("hide_patch", 8), ("loss", "sigmoid")):
        (tmp_path / "config.json").write_text(json.dumps({**old, key: value}))
        with pytest.raises(ValueError, match=rf"differs in \['{key}'\]"):
            T.train(config, _feed(digits, config), out=tmp_path, progress=False)
        with pytest.raises(ValueError, match=rf"unknown training config keys \['{key}'\]"):
            T.TrainConfig.from_dict({**old, key: value})


def test_softmax_loss_matches_numpy_definition():
    """Softmax cross-entropy ``-log softmax(z)_y``, in float64 NumPy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (6, 5))
    labels = rng.integers(0, 5, 6)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(6), labels]
    got = T.softmax_loss(jax.numpy.asarray(logits, jax.numpy.float32), jax.numpy.asarray(labels))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_config_errors_name_valid_options():
    with pytest.raises(ValueError, match="valid names are"):
        T.TrainConfig(model="resnet9")
    with pytest.raises(ValueError, match="avg"):
        T.TrainConfig(pooling="mean")
    with pytest.raises(ValueError, match="valid keys are"):
        T.TrainConfig.from_dict({"epoch": 3})
    assert T.TrainConfig.from_dict(_config().to_dict()) == _config()


def test_final_bundle_loads_into_explain(digits, tmp_path):
    """The bundle written by train() is what `flaxcam explain --weights` reads: same logits, class names."""
    from flaxcam.cli import run_explain
    from flaxcam.models import load_bundle

    config = _config(epochs=1, pooling="max")
    result = T.train(
        config,
        _feed(digits, config),
        eval_data=_feed(digits, config),
        out=tmp_path / "run",
        progress=False,
        log=lambda _: None,
    )
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["eval_count"] == 100 and 0 <= history[0]["eval_accuracy"] <= 1
    model, variables, meta = load_bundle(result.bundle)
    assert meta["class_names"] == digits.class_names and meta["input_size"] == SIZE
    assert model.pooling == "max"
    inputs = _feed(digits, config).inputs[:4]
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, inputs)), np.asarray(result.model.apply(result.variables, inputs)), rtol=1e-6
    )
    image_path = tmp_path / "canvas.png"
    Image.fromarray((digits.images[0] * 255).round().astype(np.uint8)).save(image_path)
    records, errors = run_explain(
        [image_path], weights=result.bundle, method="cam", out=tmp_path / "fig", top_k=2, progress=False
    )
    assert not errors and len(records) == 1
    assert records[0]["target"]["name"] in digits.class_names
    assert (tmp_path / "fig" / "canvas_cam.png").exists()


def test_cli_trains_on_an_image_folder_with_an_unreadable_file(tmp_path):
    """`flaxcam train folder:PATH`: the broken file is skipped and listed, the bundle and history written."""
    from typer.testing import CliRunner

    from flaxcam.cli import app

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, colour in (("red", [200, 30, 30]), ("blue", [30, 30, 200])):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(np.asarray(colour) + rng.normal(0, 40, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "blue" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    args = [
        "train",
        f"folder:{root}",
        "--out",
        str(out),
        "--val",
        f"folder:{root}",
        "--model-kwargs",
        '{"features": [4]}',
        "--size",
        "16,16",
        "--epochs",
        "2",
        "--batch-size",
        "7",
        "--learning-rate",
        "0.05",
        "--flip",
        "--shift",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 6 steps" in result.output  # 21 files // 7 = 3 steps per epoch
    errors = json.loads((out / "errors.json").read_text())
    assert [e[1] for e in errors] == ["blue/broken.png"]
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["eval_count"] == 20 and history[-1]["eval_accuracy"] >= 0.9  # colour is easy
    assert (out / "model.msgpack").exists()
    changed = CliRunner().invoke(app, [*args[:-2], "--shift", "2"])
    assert changed.exit_code == 2 and "differs in ['shift']" in changed.stderr  # one `error:` line


def test_train_step_updates_batch_norm_statistics():
    """Models with BatchNorm (the ResNets) train with train=True and carry batch_stats in the state."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    class TinyBN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
            return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))

    model, optimizer = TinyBN(), optax.sgd(0.1)
    state = T.create_train_state(model, optimizer, (1, 8, 8, 3), 0)
    images = np.random.default_rng(0).normal(2.0, 3.0, (6, 8, 8, 3)).astype(np.float32)
    new_state, loss = jax.jit(lambda s, x, y: T.train_step(model, optimizer, s, x, y))(
        state, images, np.array([0, 1, 2, 0, 1, 2])
    )
    assert int(new_state.step) == 1 and np.isfinite(float(loss))
    before = np.asarray(state.extra["batch_stats"]["BatchNorm_0"]["mean"])
    after = np.asarray(new_state.extra["batch_stats"]["BatchNorm_0"]["mean"])
    features = np.asarray(nn.Conv(4, (3, 3)).apply({"params": state.params["Conv_0"]}, images), np.float64)
    assert np.all(before == 0)
    np.testing.assert_allclose(after, 0.5 * features.mean(axis=(0, 1, 2)), rtol=1e-4)  # momentum 0.5 from 0

"""Shared fixtures of the audit tests (also imported by the subprocess script tests/audit_script.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxcam.imageio import Preprocessing

SIZE = (32, 32)
PREPROCESSING = Preprocessing(SIZE, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def data():
    import flaxcam.data

    return flaxcam.data


class WithBadImages:
    """A source whose images at ``bad`` indices are unreadable (``Record.error`` set)."""

    def __init__(self, source, bad):
        self.source, self.bad = source, frozenset(bad)
        self.class_names = source.class_names

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        if index in self.bad:
            return dataclasses.replace(record, image=None, error="corrupt test image", box=None, mask=None)
        return record


@functools.lru_cache(maxsize=4)
def canvases(count: int, seed: int = 0):
    from flaxcam.data.digits import make_digit_canvases

    d = make_digit_canvases(count, size=SIZE, digit_size=(12, 20), clutter_lines=1, seed=seed)
    images = (d.images * 255).round().astype(np.uint8)
    return images, d.labels.astype(np.int32), d.boxes.astype(np.float32)


def bad_indices(count: int) -> tuple[int, ...]:
    return tuple(range(7, count, 97))


def make_source(count: int, seed: int = 0, bad: bool = True):
    images, labels, boxes = canvases(count, seed)
    source = data().ArraySource(images, labels, tuple(str(i) for i in range(10)), boxes=boxes)
    return WithBadImages(source, bad_indices(count) if bad else ())


def make_model(seed: int = 0):
    from flaxcam.models.small import small_cnn

    model = small_cnn(10, (8, 16))
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *SIZE, 3)))
    return model, variables

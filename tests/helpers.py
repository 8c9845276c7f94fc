"""Small models and set-ups shared by several test modules (imported as ``tests.helpers``)."""

from __future__ import annotations

import os
from pathlib import Path

import flax.linen as nn
import jax

#: The repository root (the folder holding ``tests/``).
ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a Python subprocess that imports ``tests.helpers``: this one's, the repository
    root first on ``PYTHONPATH``, CPU only, plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", **extra}


class Block(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), strides=self.strides, name="conv")(x))


class UserNet(nn.Module):
    """A user's CNN: named blocks (ReLU inside), global average pooling, Dense head."""

    num_classes: int = 6
    pooling: str = "avg"

    def setup(self):
        self.stem = Block(8)
        self.mid = Block(12, strides=2)
        self.top = Block(16)
        self.head = nn.Dense(self.num_classes)

    def features(self, x):
        return self.top(self.mid(self.stem(x)))

    def classify(self, features):
        pooled = features.mean((1, 2)) if self.pooling == "avg" else features.max((1, 2))
        return self.head(pooled)

    def __call__(self, x):
        return self.classify(self.features(x))


def user_net_setup(model, shape=(5, 18, 22, 3), seed=0):
    images = jax.random.normal(jax.random.key(seed + 1), shape)
    variables = model.init(jax.random.key(seed), images)
    # Random, non-degenerate biases so that ReLUs are neither all on nor all off.
    variables = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape), variables)
    return variables, images

"""Baselines: random channel weights (a sanity check that a method beats chance)."""

from __future__ import annotations

import jax

from flaxcam.methods.registry import register

Array = jax.Array


@register("randomcam")
def randomcam(activations: Array, key: Array) -> Array:
    r"""RandomCAM: channel weights drawn uniformly from [-1, 1].

    .. math:: \alpha_k \sim U(-1, 1), \qquad M = \sum_k \alpha_k A_k

    Reproducible from the PRNG ``key`` (one key per image and target). pytorch-grad-cam's
    ``RandomCAM`` draws from NumPy's global generator; the distribution is the same.
    """
    weights = jax.random.uniform(key, (activations.shape[-1],), activations.dtype, -1.0, 1.0)
    return activations * weights

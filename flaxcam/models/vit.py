"""A tiny Vision Transformer and the ``reshape=`` function that lays its tokens out on the patch grid.

``TinyViT``: ``embed`` (a ``patch × patch`` strided conv, one class token, learned position
embeddings for a fixed ``image_size``) → encoder blocks ``blocks_0`` .. ``blocks_{depth-1}`` (pre-norm
self-attention and MLP with residuals) → ``norm`` → ``head`` on the class token. Its blocks output
tokens ``(B, 1 + h·w, dim)``, not an NHWC grid, so explain them with ``reshape=token_grid(model)``::

    model = models.tiny_vit(num_classes=5, image_size=(16, 20), patch=4)
    explanation = flaxcam.explain(model, variables, images, layer="blocks_0", reshape=models.token_grid(model))

Reference: Dosovitskiy et al. "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021 (arXiv:2010.11929); pytorch-grad-cam's ``reshape_transform`` for ViTs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    dim: int
    heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``(B, N, dim)`` tokens → ``(B, N, dim)``."""
        h = nn.LayerNorm(dtype=self.dtype)(tokens)
        tokens = tokens + nn.SelfAttention(num_heads=self.heads, qkv_features=self.dim, dtype=self.dtype)(h)
        h = nn.LayerNorm(dtype=self.dtype)(tokens)
        return tokens + nn.Dense(self.dim, dtype=self.dtype)(nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(h)))


class TinyViT(nn.Module):
    """A small ViT classifier for tests and demos; ``__call__(x, train=False)`` → logits ``(B, num_classes)``.

    Attributes:
        num_classes: width of the ``head``.
        image_size: ``(H, W)`` the position embeddings are made for (multiples of ``patch``).
        patch: patch size; the token grid is ``(H / patch, W / patch)``.
        dim, depth, heads, mlp_ratio: token width, number of blocks, attention heads, MLP width / dim.
    """

    num_classes: int = 10
    image_size: tuple[int, int] = (32, 32)
    patch: int = 4
    dim: int = 32
    depth: int = 2
    heads: int = 2
    mlp_ratio: int = 2
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(h, w)``."""
        return (self.image_size[0] // self.patch, self.image_size[1] // self.patch)

    def setup(self) -> None:
        if self.image_size[0] % self.patch or self.image_size[1] % self.patch:
            raise ValueError(f"image_size {tuple(self.image_size)} must be a multiple of patch={self.patch}")
        self.patches = nn.Conv(
            self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID", dtype=self.dtype
        )
        self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        self.position = self.param(
            "position", nn.initializers.normal(0.02), (1, 1 + self.grid[0] * self.grid[1], self.dim)
        )
        self.blocks = [
            EncoderBlock(self.dim, self.heads, self.mlp_ratio * self.dim, self.dtype) for _ in range(self.depth)
        ]
        self.norm = nn.LayerNorm(dtype=self.dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype)

    def embed(self, x: jax.Array) -> jax.Array:
        """NHWC images → tokens ``(B, 1 + h·w, dim)``: class token first, then patches in row-major order."""
        if tuple(x.shape[1:3]) != tuple(self.image_size):
            raise ValueError(
                f"TinyViT was built for images of size {tuple(self.image_size)}, got {tuple(x.shape[1:3])}"
            )
        patches = self.patches(jnp.asarray(x, self.dtype)).reshape(x.shape[0], -1, self.dim)
        cls = jnp.broadcast_to(self.cls, (x.shape[0], 1, self.dim)).astype(patches.dtype)
        return jnp.concatenate([cls, patches], axis=1) + self.position

    def encode(self, tokens: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array:
        """Run blocks ``start .. stop - 1`` on ``tokens``."""
        for block in self.blocks[start:stop]:
            tokens = block(tokens)
        return tokens

    def classify(self, tokens: jax.Array) -> jax.Array:
        """Final norm and ``head`` on the class token → logits."""
        return self.head(self.norm(tokens)[:, 0])

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(B, num_classes)`` of NHWC images ``x`` (``train`` is unused: no dropout)."""
        del train
        return self.classify(self.encode(self.embed(x)))


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """``reshape=`` function for token models: drops the first ``prefix_tokens`` tokens (class token)
    and lays the rest out row-major on ``grid``: ``(B, prefix + h·w, D) → (B, h, w, D)``.

    A frozen dataclass, so equal grids hash equal and :func:`flaxcam.explain` reuses its compiled
    program across calls (a new lambda per call would recompile)."""

    grid: tuple[int, int]
    prefix_tokens: int = 1

    def __call__(self, tokens: jax.Array) -> jax.Array:
        expected = self.prefix_tokens + self.grid[0] * self.grid[1]
        if tokens.ndim != 3 or tokens.shape[1] != expected:
            raise ValueError(
                f"TokenGrid{self.grid} with {self.prefix_tokens} prefix token(s) expects (batch, {expected}, dim) "
                f"tokens, got {tuple(tokens.shape)}"
            )
        return tokens[:, self.prefix_tokens :].reshape(tokens.shape[0], *self.grid, tokens.shape[-1])


def token_grid(model_or_grid: TinyViT | Sequence[int], prefix_tokens: int = 1) -> TokenGrid:
    """The ``reshape=`` function of a :class:`TinyViT` (its patch grid and class token), or of any
    token model given its patch grid ``(h, w)`` and number of leading non-patch tokens."""
    grid = model_or_grid.grid if isinstance(model_or_grid, TinyViT) else tuple(int(g) for g in model_or_grid)
    if len(grid) != 2:
        raise ValueError(f"the patch grid must be (height, width), got {grid}")
    return TokenGrid(grid, prefix_tokens)


def tiny_vit(
    num_classes: int = 10,
    image_size: Sequence[int] = (224, 224),
    patch: int = 16,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    dtype: Dtype = jnp.float32,
) -> TinyViT:
    """A tiny ViT (default: 224×224 images, 16×16 patches → a 14×14 grid, 4 blocks of width 64)."""
    return TinyViT(
        num_classes, cast(tuple[int, int], tuple(int(s) for s in image_size)), patch, dim, depth, heads, dtype=dtype
    )

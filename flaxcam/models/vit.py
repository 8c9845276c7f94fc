"""A tiny Vision Transformer and the ``reshape=`` function that lays its tokens out on the patch grid.

``TinyViT``: ``embed`` (a ``patch × patch`` strided conv, one class token, learned position
embeddings for a fixed ``image_size``) → encoder blocks ``blocks_0`` .. ``blocks_{depth-1}`` (pre-norm
self-attention and MLP with residuals) → ``norm`` → ``head`` on the class token: torchvision's
``VisionTransformer`` (exact GELU, LayerNorm eps 1e-6), whose weights :func:`convert_torchvision_vit`
reads. Its blocks output tokens ``(B, 1 + h·w, dim)``, not an NHWC grid, so explain them with
``reshape=token_grid(model)``::

    model = models.tiny_vit(num_classes=5, image_size=(16, 20), patch=4)
    explanation = flaxcam.explain(model, variables, images, layer="blocks_0", reshape=models.token_grid(model))

Each block's attention softmax runs in its own :class:`AttentionProbabilities` submodule
(``blocks_0.attention.probabilities``, output ``(B, heads, queries, keys)``), so the attention
probabilities are a layer like any other: attention methods (``method="legrad"``) read them and take
gradients with respect to them.

Reference: Dosovitskiy et al. "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021 (arXiv:2010.11929); pytorch-grad-cam's ``reshape_transform`` for ViTs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


class AttentionProbabilities(nn.Module):
    """The softmax over the keys of attention logits ``(B, heads, queries, keys)``: a module of its own
    so that the attention probabilities are a named layer that flaxcam can read and perturb (a model
    that computes its softmax in a submodule of this class name — linen or NNX — works with the
    attention methods)."""

    @nn.compact
    def __call__(self, logits: jax.Array) -> jax.Array:
        return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """Multi-head self-attention as ``torch.nn.MultiheadAttention``: ``query`` / ``key`` / ``value``
    projections to ``(heads, dim / heads)``, ``softmax(q k^T / sqrt(dim / heads))`` in
    ``probabilities``, then ``out``."""

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``(B, N, dim)`` → ``(B, N, dim)``."""
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        head_dim = self.dim // self.heads

        def project(name: str) -> jax.Array:
            return nn.DenseGeneral((self.heads, head_dim), dtype=self.dtype, name=name)(tokens)

        query, key, value = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", query / jnp.sqrt(head_dim).astype(query.dtype), key)
        probabilities = AttentionProbabilities(name="probabilities")(logits)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", probabilities, value)
        return nn.DenseGeneral(self.dim, axis=(-2, -1), dtype=self.dtype, name="out")(mixed)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (exact GELU)."""

    dim: int
    heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``(B, N, dim)`` tokens → ``(B, N, dim)``."""
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(tokens)
        tokens = tokens + Attention(self.dim, self.heads, self.dtype, name="attention")(h)
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(tokens)
        hidden = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(h), approximate=False)
        return tokens + nn.Dense(self.dim, dtype=self.dtype)(hidden)


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
        self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
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

    def project_tokens(self, tokens: jax.Array) -> jax.Array:
        """Logits of any block's tokens ``(B, N, dim)``: final norm and ``head`` on the mean of all
        tokens — LeGrad's per-layer score (torchcam's projection for torchvision ViTs)."""
        return self.head(self.norm(jnp.mean(tokens, axis=1)))

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


def convert_torchvision_vit(
    state_dict: Mapping[str, Any], heads: int, dtype: Dtype = jnp.float32
) -> tuple[TinyViT, dict[str, Any]]:
    """A torchvision ``VisionTransformer`` ``state_dict`` (torch tensors or numpy arrays; torch is never
    imported) → ``(TinyViT, variables)`` computing the same function on NHWC images. ``heads`` is the
    number of attention heads (the weights do not tell it); the patch size, width, depth, MLP width,
    classes and the (square) patch grid are read from the weights. The MLP width must be a multiple of
    the token width (``TinyViT.mlp_ratio``) and the classifier a single ``heads.head`` Linear."""
    from flaxcam.models.convert import _to_numpy

    weights = {key: _to_numpy(value) for key, value in state_dict.items()}
    missing = [
        key
        for key in ("class_token", "conv_proj.weight", "encoder.pos_embedding", "heads.head.weight")
        if key not in weights
    ]
    if missing:
        raise ValueError(f"not a torchvision VisionTransformer state_dict: missing {missing}")
    dim, _, patch, _ = weights["conv_proj.weight"].shape
    tokens = weights["encoder.pos_embedding"].shape[1]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ValueError(f"the position embeddings hold {tokens - 1} patch tokens, not a square grid")
    depth = len({key.split(".")[2] for key in weights if key.startswith("encoder.layers.")})
    mlp_dim = weights["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0]
    if mlp_dim % dim:
        raise ValueError(f"MLP width {mlp_dim} is not a multiple of the token width {dim}")
    if dim % heads:
        raise ValueError(f"token width {dim} is not a multiple of heads={heads}")
    head_dim = dim // heads
    model = TinyViT(
        num_classes=weights["heads.head.weight"].shape[0],
        image_size=(side * patch, side * patch),
        patch=patch,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_dim // dim,
        dtype=dtype,
    )

    def dense(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": weights[f"{prefix}.weight"].T, "bias": weights[f"{prefix}.bias"]}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}

    params: dict[str, Any] = {
        "patches": {"kernel": weights["conv_proj.weight"].transpose(2, 3, 1, 0), "bias": weights["conv_proj.bias"]},
        "cls": weights["class_token"],
        "position": weights["encoder.pos_embedding"],
        "norm": norm("encoder.ln"),
        "head": dense("heads.head"),
    }
    for index in range(depth):
        prefix = f"encoder.layers.encoder_layer_{index}"
        in_weight, in_bias = (
            weights[f"{prefix}.self_attention.in_proj_weight"],
            weights[f"{prefix}.self_attention.in_proj_bias"],
        )
        attention = {
            name: {
                "kernel": in_weight[i * dim : (i + 1) * dim].T.reshape(dim, heads, head_dim),
                "bias": in_bias[i * dim : (i + 1) * dim].reshape(heads, head_dim),
            }
            for i, name in enumerate(("query", "key", "value"))
        }
        attention["out"] = {
            "kernel": weights[f"{prefix}.self_attention.out_proj.weight"].T.reshape(heads, head_dim, dim),
            "bias": weights[f"{prefix}.self_attention.out_proj.bias"],
        }
        params[f"blocks_{index}"] = {
            "LayerNorm_0": norm(f"{prefix}.ln_1"),
            "attention": attention,
            "LayerNorm_1": norm(f"{prefix}.ln_2"),
            "Dense_0": dense(f"{prefix}.mlp.0"),
            "Dense_1": dense(f"{prefix}.mlp.3"),
        }
    target = np.dtype(dtype)
    return model, {"params": jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, target), params)}

"""Guided backpropagation on any Flax model, without edits: the model's ReLUs become guided ReLUs by
re-interpreting its traced program (jaxpr).

A ReLU in a Flax model is a function call (``nn.relu(x)``, ``jax.nn.relu(x)``, ``jnp.maximum(x, 0)``),
not a module that could be swapped as pytorch-grad-cam swaps ``torch.nn.ReLU``. :func:`guided_relus`
traces the function to a jaxpr and evaluates it equation by equation, replacing

* every ``jax.nn.relu`` (the ``custom_jvp_call`` whose body is ``max(x, 0)``; ``flax.linen.relu`` is the
  same function) and
* every ``max(x, 0)`` / ``max(0, x)`` with a literal zero (``jnp.maximum(x, 0)``, ``jnp.maximum(x, 0.0)``)

with :func:`guided_relu`, whose backward pass lets a gradient through only where both the input and
the incoming gradient are positive. Everything else is bound as traced, with its own derivative.

Limits: ReLU6 (``jax.nn.relu6``), leaky ReLU, GELU, SiLU and other activations keep their ordinary
derivative (as in pytorch-grad-cam, which replaces only ``torch.nn.ReLU``); a maximum with a zero
*array* (``jnp.maximum(x, jnp.zeros_like(x))``) is not recognized; ReLUs inside control flow
(``lax.scan``, ``lax.cond``, ``while``), ``jax.checkpoint`` / ``nn.remat`` bodies and custom-VJP
functions are not rewritten (their bodies are bound as they are). ``jit`` boundaries inside the model
are inlined.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from flaxcam.methods.registry import register

Array = jax.Array


@jax.custom_vjp
def guided_relu(x: Array) -> Array:
    r"""ReLU with the guided-backpropagation derivative (Springenberg et al. 2015):

    .. math:: y = \max(x, 0), \qquad \frac{\partial L}{\partial x} = [x > 0]\,[g > 0]\, g,
              \quad g = \frac{\partial L}{\partial y}

    (pytorch-grad-cam's ``GuidedBackpropReLU``)."""
    return jnp.maximum(x, 0)


def _guided_relu_forward(x: Array) -> tuple[Array, Array]:
    return jnp.maximum(x, 0), x


def _guided_relu_backward(x: Array, gradient: Array) -> tuple[Array]:
    return (jnp.where((x > 0) & (gradient > 0), gradient, jnp.zeros_like(gradient)),)


guided_relu.defvjp(_guided_relu_forward, _guided_relu_backward)


def _is_zero_literal(atom: Any) -> bool:
    return isinstance(atom, jex_core.Literal) and np.ndim(atom.val) == 0 and atom.val == 0


def _relu_operand(eqn: Any) -> int | None:
    """The index of ``x`` when ``eqn`` is ``max(x, 0)`` or ``max(0, x)`` with a literal zero, else None."""
    if eqn.primitive.name != "max" or len(eqn.invars) != 2:
        return None
    for index in (0, 1):
        if _is_zero_literal(eqn.invars[1 - index]) and not _is_zero_literal(eqn.invars[index]):
            return index
    return None


def _is_relu_body(jaxpr: Any) -> bool:
    """True when a jaxpr is one ``max(x, 0)`` of its input, possibly inside nested ``jit`` calls (the
    body of ``jax.nn.relu``)."""
    if len(jaxpr.eqns) != 1:
        return False
    eqn = jaxpr.eqns[0]
    if eqn.primitive.name in ("jit", "pjit"):
        return _is_relu_body(eqn.params["jaxpr"].jaxpr)
    return _relu_operand(eqn) is not None


def _evaluate(jaxpr: Any, consts: list[Any], *args: Any) -> list[Any]:
    """Evaluate ``jaxpr`` with every ReLU replaced by :func:`guided_relu` (see the module docstring)."""
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [read(atom) for atom in eqn.invars]
        name = eqn.primitive.name
        operand = _relu_operand(eqn)
        if operand is not None:
            outputs = [guided_relu(inputs[operand])]
        elif name == "custom_jvp_call" and _is_relu_body(eqn.params["call_jaxpr"].jaxpr):
            outputs = [guided_relu(inputs[-1])]
        elif name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outputs = _evaluate(inner.jaxpr, inner.consts, *inputs)
        else:
            with eqn.ctx.manager:
                result = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
            outputs = result if eqn.primitive.multiple_results else [result]
        for var, value in zip(eqn.outvars, outputs):
            if not isinstance(var, jex_core.DropVar):
                env[var] = value
    return [read(atom) for atom in jaxpr.outvars]


def guided_relus(fn: Callable) -> Callable:
    """``fn`` with the guided-backpropagation derivative at every ReLU it calls (positional array
    arguments, any pytree; see the module docstring for what counts as a ReLU). The forward values are
    ``fn``'s own."""

    @functools.wraps(fn)
    def guided(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outputs = _evaluate(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outputs)

    return guided


@dataclasses.dataclass(frozen=True)
class GuidedModel:
    """A Flax model whose ``apply`` backpropagates through its ReLUs as guided ReLUs (forward values
    unchanged); the layer names and variables are the model's own."""

    model: nn.Module

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return guided_relus(lambda v, *a: self.model.apply(v, *a, **kwargs))(variables, *args)

    def as_adapter(self, apply_kwargs: tuple = ()) -> GuidedAdapter:
        """The :mod:`flaxcam.capture` adapter of the wrapped model, with guided ReLUs."""
        from flaxcam.capture import as_model

        return GuidedAdapter(as_model(self.model, apply_kwargs))


@dataclasses.dataclass(frozen=True)
class GuidedAdapter:
    """A :mod:`flaxcam.capture` model adapter (linen or NNX) whose ``apply`` and ``forward``
    backpropagate through the model's ReLUs as guided ReLUs; everything else is the wrapped adapter's."""

    inner: Any
    is_model_adapter = True  # flaxcam.capture.as_model takes it as it is

    def apply(self, variables: Any, images: Array) -> Any:
        return guided_relus(self.inner.apply)(variables, images)

    def forward(self, variables, images, layers, deltas=None, record_inputs_of=None, replacements=None):
        def run(variables, images, deltas, replacements):
            return self.inner.forward(variables, images, layers, deltas, record_inputs_of, replacements)

        return guided_relus(run)(variables, images, deltas, replacements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@register("guided_backprop", bias_layers=True, guided=True)
def guided_backprop(input_gradients: Array) -> Array:
    r"""Guided backpropagation as a map: the largest absolute guided gradient over the input's channels,

    .. math:: M(x, y) = \max_c \left| \frac{\partial^{\mathrm{guided}} y^c}{\partial I_c(x, y)} \right|

    with every ReLU of the network backpropagating as :func:`guided_relu`. The signed ``(H, W, C)``
    gradient itself (pytorch-grad-cam's ``GuidedBackpropReLUModel`` output) is
    :func:`flaxcam.guided.guided_gradients`.

    Reference: Springenberg, Dosovitskiy, Brox, Riedmiller. "Striving for Simplicity: The All
    Convolutional Net", ICLR Workshops 2015 (arXiv:1412.6806).
    """
    return jnp.max(jnp.abs(input_gradients), axis=-1)

"""flaxcam: class activation maps (CAM, Grad-CAM, ...) for JAX/Flax models at accelerator throughput.

The public API is small:

* :func:`explain` — maps for a batch in one jitted, vmapped, sharded call, returning an
  :class:`Explanation` (linen: ``explain(model, variables, images)``; NNX: ``explain(model, images)``);
* :func:`explainer` — the same as a pure step ``fn(variables, images, targets=None, key=None)`` to
  compose with ``jit``, ``vmap``, ``lax.scan`` and user meshes;
* :data:`METHODS` — the registered methods (``"cam"``, ``"gradcam"``, ...);
* :func:`list_layers` — the target layers a model has;
* :mod:`flaxcam.models`, :mod:`flaxcam.localize`, :mod:`flaxcam.colormap`, :mod:`flaxcam.viz`.
"""

from flaxcam.methods import METHODS
from flaxcam.pipeline import Explanation, bucket_size, explain
from flaxcam.plan import Explainer, explainer
from flaxcam.probe import LayerError, LayerInfo, list_layers

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Explainer",
    "Explanation",
    "LayerError",
    "LayerInfo",
    "bucket_size",
    "explain",
    "explainer",
    "list_layers",
]

"""Optional dependencies: import one, or fail with one line naming the extra that provides it.

flaxcam's base install covers :func:`flaxcam.explain` and ``flaxcam explain``; the other features live in
extras (``pip install 'flaxcam[audit]'``, ``[tfds]``, ``[train]``, ``[demo]``, ``[all]``). An import site
of such a feature reads::

    pa = require("pyarrow", extra="audit")
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Which extra provides each optional top-level module (the distribution name where it differs).
EXTRAS: dict[str, tuple[str, str]] = {
    "pyarrow": ("audit", "pyarrow"),
    "duckdb": ("audit", "duckdb"),
    "grain": ("audit", "grain"),
    "tensorflow_datasets": ("tfds", "tensorflow-datasets"),
    "optax": ("train", "optax"),
    "orbax": ("train", "orbax-checkpoint"),
    "skimage": ("demo", "scikit-image"),
    "sklearn": ("demo", "scikit-learn"),
}


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed. It is an :class:`ImportError` (so ``except ImportError``
    keeps working) and a :class:`ValueError` (so the command line reports it as one ``error:`` line)."""


def missing_extra_message(module: str, extra: str | tuple[str, ...]) -> str:
    """The one line shown when ``module`` (provided by ``flaxcam[extra]``) is missing."""
    top = module.partition(".")[0]
    distribution = EXTRAS.get(top, ("", top))[1]
    extras = (extra,) if isinstance(extra, str) else tuple(extra)
    commands = " or ".join(f"pip install 'flaxcam[{name}]'" for name in extras)
    return (
        f"this feature needs the optional package {distribution!r}, which is not installed; install it with: {commands}"
    )


def require(module: str, *, extra: str | tuple[str, ...]) -> ModuleType:
    """Import ``module`` (dotted names allowed, e.g. ``"pyarrow.parquet"``) and return it; if its
    top-level package is not installed, raise :class:`MissingExtraError` naming ``flaxcam[extra]`` (or
    each of several extras that provide it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.partition(".")[0]
        if error.name is None or error.name.partition(".")[0] != top:
            raise  # the package is there but one of *its* imports failed: show the real error
        raise MissingExtraError(missing_extra_message(module, extra), name=top) from None

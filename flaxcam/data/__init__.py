"""Data sources and batching for audit and training.

* Sources (random access, :class:`Record` per index, never raising for a bad file):
  :class:`ArraySource`, :class:`NpzSource` (:func:`save_npz`), :class:`ImageFolderSource`,
  :class:`Ham10000Source`, :class:`TfdsSource`; :func:`open_source` builds one from a string.
* :func:`iterate_batches`: indices → shard → padded :class:`Batch` es of model inputs through grain.
* :func:`make_ham10000_fixture`: a generated dataset in the HAM10000 layout.
* :func:`make_digit_canvases`: digits on a cluttered canvas with ground-truth boxes;
  :func:`make_background_canvases`: the same canvases without a digit; :func:`draw_marker`: a planted
  corner marker (a shortcut) on any images.
"""

from flaxcam.data.digits import (
    CLASS_NAMES,
    MARKER_CORNERS,
    DigitCanvases,
    draw_marker,
    make_background_canvases,
    make_digit_canvases,
    marker_region,
)
from flaxcam.data.fixtures import make_ham10000_fixture
from flaxcam.data.loader import (
    Batch,
    batch_rows,
    iterate_batches,
    ordered_indices,
    shard_indices,
)
from flaxcam.data.sources import (
    HAM10000_CLASSES,
    SOURCE_KINDS,
    ArraySource,
    Ham10000Source,
    ImageFolderSource,
    ImageSource,
    NpzSource,
    Record,
    TfdsSource,
    open_source,
    save_npz,
)

__all__ = [
    "CLASS_NAMES",
    "HAM10000_CLASSES",
    "MARKER_CORNERS",
    "SOURCE_KINDS",
    "ArraySource",
    "Batch",
    "DigitCanvases",
    "Ham10000Source",
    "ImageFolderSource",
    "ImageSource",
    "NpzSource",
    "Record",
    "TfdsSource",
    "batch_rows",
    "draw_marker",
    "iterate_batches",
    "make_background_canvases",
    "make_digit_canvases",
    "make_ham10000_fixture",
    "marker_region",
    "open_source",
    "ordered_indices",
    "save_npz",
    "shard_indices",
]

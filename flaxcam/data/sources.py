"""Random-access image sources: NumPy arrays, ``.npz`` files, image folders, the HAM10000 layout, TFDS.

Every source maps an index ``0..len-1`` to a :class:`Record` and never raises for a bad example: an
image that cannot be read or converted gives ``Record(image=None, error="reason")``, so one bad file
never stops a pass over a dataset. Sources are plain picklable objects (grain can read them from
worker processes). Images come out as ``(H, W, 3)`` uint8 RGB whatever the file's mode (see
:func:`flaxcam.imageio.read_image`).

Boxes are ``[x0, y0, x1, y1]`` in pixels of ``Record.image`` with an exclusive end, as everywhere in
flaxcam (:func:`flaxcam.localize.boxes`, :mod:`flaxcam.metrics`, the audit's columns).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
from PIL import Image

from flaxcam._optional import require
from flaxcam.imageio import (
    ImageReadError,
    as_rgb_uint8,
    read_image_bytes,
    read_image_with_size,
)

Box = tuple[float, float, float, float]

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
"""HAM10000's seven diagnoses (``dx``), sorted; a label is the position in this tuple."""

HAM10000_METADATA_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")


@dataclasses.dataclass(frozen=True)
class Record:
    """One example. ``image`` is ``(H, W, 3)`` uint8 RGB, or ``None`` with ``error`` giving the reason.

    ``label`` is the class index (-1 when unknown); ``box`` is the ground truth ``(x0, y0, x1, y1)``
    in pixels of ``image`` (exclusive end); ``mask`` an ``(H, W)`` bool ground-truth mask; ``size``
    the ``(height, width)`` of the image in its file when ``image`` was decoded at reduced scale
    (``None``: ``image.shape[:2]``).
    """

    index: int
    id: str
    image: np.ndarray | None
    label: int
    error: str | None = None
    box: Box | None = None
    mask: np.ndarray | None = None
    size: tuple[int, int] | None = None


@runtime_checkable
class ImageSource(Protocol):
    """Random access to :class:`Record` s, so grain can shard and shuffle it."""

    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} records")
    return index


#: How a ground-truth box is written, for error messages.
BOX_ORDER = "[x0, y0, x1, y1] (pixels, exclusive end)"


def _box_tuple(row: np.ndarray | Sequence[float] | None) -> Box | None:
    if row is None:
        return None
    values = np.asarray(row, dtype=np.float64)
    if values.shape != (4,):
        raise ValueError(f"a box must have 4 values {BOX_ORDER}, got shape {values.shape}")
    if np.any(np.isnan(values)):
        return None
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def check_boxes(boxes: Any, count: int) -> np.ndarray:
    """``boxes`` as ``(count, 4)`` float64 ``[x0, y0, x1, y1]`` (NaN rows: no box), or a ``ValueError``
    that states the order: a wrong shape, or an end before its start (``x1 < x0`` or ``y1 < y0``)."""
    values = np.asarray(boxes, np.float64)
    if count == 0 and values.size == 0:
        values = values.reshape(0, 4)
    if values.shape != (count, 4):
        raise ValueError(f"boxes must have shape ({count}, 4): one row {BOX_ORDER} per image, got {values.shape}")
    with np.errstate(invalid="ignore"):
        inverted = (values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1])
    if inverted.any():
        row = int(np.flatnonzero(inverted)[0])
        raise ValueError(f"box {row} is {values[row].tolist()}: its end is before its start; boxes are {BOX_ORDER}")
    return values


def _checked_mask(mask: np.ndarray | None, image: np.ndarray | None) -> tuple[np.ndarray | None, str | None]:
    """The mask as ``(H, W)`` bool, or an error when its size does not match the image."""
    if mask is None or image is None:
        return (None if mask is None else np.asarray(mask, bool)), None
    mask = np.asarray(mask).astype(bool)
    if mask.shape != image.shape[:2]:
        return None, f"mask of shape {mask.shape} does not match the image of shape {image.shape[:2]}"
    return mask, None


class ArraySource:
    """In-memory images: an ``(N, H, W[, C])`` array or a sequence of ``(h, w[, C])`` arrays of any sizes.

    Args:
      images: uint8, uint16, bool or float in [0, 1]; 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA)
        channels (converted by :func:`flaxcam.imageio.as_rgb_uint8`; a bad one gives ``Record.error``).
      labels: ``(N,)`` class indices (default: -1 for all).
      class_names: default ``("0", ..., str(max label))``.
      boxes: ``(N, 4)`` ground truth ``[x0, y0, x1, y1]`` in pixels (exclusive end), NaN rows for "no box".
      masks: ``(N, H, W)`` bool or a sequence with ``None`` for "no mask".
      ids: ``N`` unique strings (default ``str(index)``).
    """

    def __init__(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        labels: np.ndarray | Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        boxes: np.ndarray | Sequence[Sequence[float]] | None = None,
        masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
        ids: Sequence[str] | None = None,
    ) -> None:
        count = len(images)
        self.images = images
        self.labels = np.full(count, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
        if len(self.labels) != count:
            raise ValueError(f"{len(self.labels)} labels for {count} images")
        if class_names is None:
            top = int(self.labels.max(initial=-1))
            class_names = tuple(str(i) for i in range(top + 1))
        self.class_names = tuple(str(name) for name in class_names)
        if len(self.labels) and int(self.labels.max(initial=-1)) >= len(self.class_names):
            raise ValueError(f"label {int(self.labels.max())} has no name among {len(self.class_names)} class_names")
        self.boxes = None if boxes is None else check_boxes(boxes, count)
        self.masks = masks
        if masks is not None and len(masks) != count:
            raise ValueError(f"{len(masks)} masks for {count} images")
        self.ids = tuple(str(i) for i in range(count)) if ids is None else tuple(str(i) for i in ids)
        if len(self.ids) != count:
            raise ValueError(f"{len(self.ids)} ids for {count} images")
        if len(set(self.ids)) != count:
            raise ValueError("ids must be unique")

    @classmethod
    def from_digits(cls, canvases: Any) -> ArraySource:
        """A source over :class:`flaxcam.data.DigitCanvases` (images, labels, class names and boxes)."""
        return cls(canvases.images, canvases.labels, canvases.class_names, boxes=canvases.boxes)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.class_names)} classes)"

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, len(self))
        label = int(self.labels[index])
        box = None if self.boxes is None else _box_tuple(self.boxes[index])
        try:
            image = as_rgb_uint8(np.asarray(self.images[index]))
        except ValueError as error:
            return Record(index, self.ids[index], None, label, f"{self.ids[index]}: {error}", box)
        mask, mask_error = _checked_mask(None if self.masks is None else self.masks[index], image)
        return Record(index, self.ids[index], image, label, mask_error, box, mask)


def save_npz(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    class_names: Sequence[str] | None = None,
    boxes: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    **extras: np.ndarray,
) -> Path:
    """Write arrays that :class:`NpzSource` reads (keys ``images``, ``labels`` and the optional
    ``class_names``, ``boxes`` ``(N, 4)`` as ``[x0, y0, x1, y1]``, ``masks``, ``ids``; any other
    keyword array, e.g. ``marked=canvases.marked``, is stored as is and comes back in
    ``NpzSource.extras``); returns the path written (NumPy appends ``.npz`` when missing).
    :class:`NpzSource` loads the whole file into memory."""
    arrays: dict[str, np.ndarray] = {"images": np.asarray(images)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)
    if class_names is not None:
        arrays["class_names"] = np.asarray([str(n) for n in class_names])
    if boxes is not None:
        arrays["boxes"] = check_boxes(boxes, len(arrays["images"])).astype(np.float32)
    if masks is not None:
        arrays["masks"] = np.asarray(masks, bool)
    if ids is not None:
        arrays["ids"] = np.asarray([str(i) for i in ids])
    for name, value in extras.items():
        arrays[name] = np.asarray(value)
    path = Path(path)
    # cast: in numpy's stub a str-keyed **dict could fill the keyword allow_pickle (bool); these keys are array names
    np.savez(path, **cast(dict[str, Any], arrays))
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


class NpzSource(ArraySource):
    """A ``.npz`` file with ``images`` ``(N, H, W[, C])`` and optional ``labels``, ``class_names``,
    ``boxes`` ``(N, 4)`` as ``[x0, y0, x1, y1]``, ``masks`` ``(N, H, W)`` and ``ids`` (see
    :func:`save_npz`). Other arrays in the file are kept in ``extras`` (name → array)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such .npz file")
        with np.load(self.path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ValueError(f"{self.path}: no 'images' array (found: {', '.join(data.files)})")
            arrays = {key: data[key] for key in data.files}
        known = ("images", "labels", "class_names", "boxes", "masks", "ids")
        self.extras: dict[str, np.ndarray] = {k: v for k, v in arrays.items() if k not in known}
        super().__init__(
            arrays["images"],
            arrays.get("labels"),
            None if "class_names" not in arrays else [str(n) for n in arrays["class_names"]],
            boxes=arrays.get("boxes"),
            masks=arrays.get("masks"),
            ids=None if "ids" not in arrays else [str(i) for i in arrays["ids"]],
        )


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class ImageFolderSource:
    """``root/<class>/<files>`` (files found recursively under each class folder); classes are the
    sorted folder names, files are sorted by their path relative to ``root`` (the record id).

    Files whose extension Pillow does not know (``extensions``, default: every extension Pillow
    registers) are not records; they are listed in ``skipped``. Hidden files and folders (a name
    starting with ".") are ignored. A file that cannot be read gives ``Record.error``.
    ``max_pixels`` is the size guard and ``draft_size`` the JPEG fast path of
    :func:`flaxcam.imageio.read_image_with_size`.

    ``exclude``: folders (or files) that are never read as data, e.g. an output folder placed inside
    ``root``: a class folder inside an excluded path is not a class, a file inside one is not a record.
    :meth:`excluding` adds paths to a source already open.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        extensions: Sequence[str] | None = None,
        max_pixels: int | None = None,
        draft_size: tuple[int, int] | None = None,
        exclude: Sequence[str | os.PathLike] = (),
    ) -> None:
        self.root = Path(root)
        self.draft_size = draft_size
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder (expected root/<class>/<image files>)")
        self.extensions = extensions
        allowed = (
            _image_extensions()
            if extensions is None
            else frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        )
        self.max_pixels = max_pixels
        self.exclude: tuple[Path, ...] = tuple(Path(p) for p in exclude)
        excluded = _relative_parts(self.root, self.exclude)

        def is_excluded(relative: Path) -> bool:
            return any(relative.parts[: len(parts)] == parts for parts in excluded)

        classes = sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not is_excluded(Path(p.name))
        )
        if not classes and () in excluded:
            raise ValueError(
                f"{self.root}: the folder itself is excluded ({', '.join(map(str, self.exclude))}): "
                "put the output folder elsewhere"
            )
        if not classes:
            raise ValueError(f"{self.root}: no class folders (expected root/<class>/<image files>)")
        self.class_names: tuple[str, ...] = tuple(classes)
        files: list[tuple[str, int]] = []
        skipped: list[str] = []
        for label, name in enumerate(classes):
            for path in (self.root / name).rglob("*"):
                relative = path.relative_to(self.root)
                if any(part.startswith(".") for part in relative.parts) or is_excluded(relative) or path.is_dir():
                    continue
                if path.suffix.lower() in allowed:
                    files.append((relative.as_posix(), label))
                else:
                    skipped.append(relative.as_posix())
        files.sort()
        self.ids: tuple[str, ...] = tuple(f for f, _ in files)
        self.labels = np.asarray([label for _, label in files], np.int64)
        self.skipped: tuple[str, ...] = tuple(sorted(skipped))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}: {len(self)} images, {len(self.class_names)} classes)"

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, len(self))
        record_id, label = self.ids[index], int(self.labels[index])
        try:
            image, size = read_image_with_size(
                self.root / record_id, max_pixels=self.max_pixels, draft_size=self.draft_size
            )
        except ImageReadError as error:
            return Record(index, record_id, None, label, str(error))
        return Record(index, record_id, image, label, size=None if size == image.shape[:2] else size)

    def with_draft_size(self, size: tuple[int, int] | None) -> ImageFolderSource:
        """A copy that decodes JPEGs at reduced scale covering ``size`` (see ``draft_size``)."""
        clone = copy.copy(self)
        clone.draft_size = size
        return clone

    def excluding(self, *paths: str | os.PathLike) -> ImageFolderSource:
        """This source without anything under ``paths`` (``self`` when none of them is inside ``root``)."""
        if not _relative_parts(self.root, [Path(p) for p in paths]):
            return self
        return ImageFolderSource(
            self.root,
            extensions=self.extensions,
            max_pixels=self.max_pixels,
            draft_size=self.draft_size,
            exclude=(*self.exclude, *paths),
        )


def _relative_parts(root: Path, paths: Sequence[Path]) -> list[tuple[str, ...]]:
    """The parts, relative to ``root``, of those ``paths`` that lie inside ``root`` (symbolic links and
    ``..`` resolved; a path that does not exist yet counts too). ``root`` itself gives ``()``, which
    excludes everything."""
    base = root.resolve()
    inside = []
    for path in paths:
        try:
            inside.append(Path(path).resolve().relative_to(base).parts)
        except ValueError:
            continue
    return inside


class Ham10000Source:
    """The HAM10000 layout: ``root/HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx, dx_type,
    age, sex, localization``; ``image_id`` and ``dx`` are required) and ``root/HAM10000_images_part_1/``,
    ``root/HAM10000_images_part_2/`` holding ``<image_id>.jpg`` (450x600 RGB JPEGs).

    Labels index :data:`HAM10000_CLASSES` (``akiec, bcc, bkl, df, mel, nv, vasc``). Records follow the
    metadata's row order; the id is the ``image_id``. A row whose image is missing or unreadable, or
    whose ``dx`` is not one of the seven, gives ``Record.error``. ``max_pixels`` and ``draft_size`` as
    for :class:`ImageFolderSource`. ``lesion_ids`` (one per record) lets
    a train/test split keep all images of a lesion together. Image folders are found by name, case
    insensitively (``ham10000_images_part_*``); images directly under ``root`` are found too.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        metadata: str | os.PathLike = "HAM10000_metadata.csv",
        *,
        max_pixels: int | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.metadata = self.root / metadata
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.class_names: tuple[str, ...] = HAM10000_CLASSES
        if not self.metadata.is_file():
            raise FileNotFoundError(
                f"{self.metadata}: no such metadata file (expected HAM10000_metadata.csv in {self.root})"
            )
        with open(self.metadata, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("image_id", "dx") if c not in columns]
            if missing:
                raise ValueError(
                    f"{self.metadata}: missing column(s) {missing}; found {columns} (needed: image_id, dx)"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        self.ids: tuple[str, ...] = tuple(row["image_id"] for row in rows)
        duplicates = len(self.ids) - len(set(self.ids))
        if duplicates:
            raise ValueError(f"{self.metadata}: {duplicates} duplicate image_id value(s)")
        self.dx: tuple[str, ...] = tuple(row["dx"] for row in rows)
        self.lesion_ids: tuple[str, ...] = tuple(row.get("lesion_id", "") for row in rows)
        self.rows: tuple[dict[str, str], ...] = tuple(rows)
        lookup = {name: i for i, name in enumerate(HAM10000_CLASSES)}
        self.labels = np.asarray([lookup.get(dx, -1) for dx in self.dx], np.int64)
        self.paths: dict[str, Path] = {}
        folders = [
            self.root,
            *sorted(
                (p for p in self.root.iterdir() if p.is_dir() and p.name.lower().startswith("ham10000_images_part")),
                key=lambda p: p.name,
            ),
        ]
        for folder in folders:
            for path in folder.iterdir():
                if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.is_file():
                    self.paths.setdefault(path.stem, path)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Ham10000Source({str(self.root)!r}: {len(self)} images)"

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, len(self))
        image_id, label = self.ids[index], int(self.labels[index])
        if label < 0:
            return Record(
                index,
                image_id,
                None,
                -1,
                f"{image_id}: unknown dx {self.dx[index]!r} (valid: {', '.join(HAM10000_CLASSES)})",
            )
        path = self.paths.get(image_id)
        if path is None:
            return Record(
                index,
                image_id,
                None,
                label,
                f"{image_id}: image file not found in {self.root} (HAM10000_images_part_1/2)",
            )
        try:
            image, size = read_image_with_size(path, max_pixels=self.max_pixels, draft_size=self.draft_size)
        except ImageReadError as error:
            return Record(index, image_id, None, label, str(error))
        return Record(index, image_id, image, label, size=None if size == image.shape[:2] else size)

    def with_draft_size(self, size: tuple[int, int] | None) -> Ham10000Source:
        """A copy that decodes JPEGs at reduced scale covering ``size`` (see ``draft_size``)."""
        clone = copy.copy(self)
        clone.draft_size = size
        return clone


def _detect_feature(features: Any, kind: str, preferred: str) -> str | None:
    """The key of a top-level TFDS feature of type ``kind`` (``preferred`` first)."""
    tfds = require("tensorflow_datasets", extra="tfds")

    types = {"image": tfds.features.Image, "label": tfds.features.ClassLabel, "box": tfds.features.BBoxFeature}[kind]
    keys = list(features.keys())
    if preferred in keys and isinstance(features[preferred], types):
        return preferred
    matches = [k for k in keys if isinstance(features[k], types)]
    return matches[0] if matches else None


class TfdsSource:
    """A TFDS dataset through ``tfds.data_source`` (ArrayRecord files, random access, no TensorFlow).

    The dataset must be prepared under ``data_dir`` already (nothing is downloaded). The image and
    label features are detected: the ``Image`` feature named ``image_key`` (default "image") or else
    the first top-level ``Image`` feature; the ``ClassLabel`` named ``label_key`` (default "label") or
    else the first one (no label feature: labels are -1). Ids are ``"tfds:NAME:SPLIT:INDEX"``.

    Ground truth: ``box_key`` names a ``BBoxFeature`` (TFDS's normalized ``(ymin, xmin, ymax, xmax)``,
    turned into a pixel box ``[x0, y0, x1, y1]`` of the image); default "bbox" or else the first top-level
    ``BBoxFeature``
    (``""`` for none). A nested key such as ``"objects/bbox"`` (several boxes per image) gives the box
    enclosing them all. ``mask_key`` names an image-like feature whose nonzero pixels form the mask
    (none by default; it must have the image's height and width).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        *,
        image_key: str = "image",
        label_key: str = "label",
        box_key: str | None = "bbox",
        mask_key: str | None = None,
    ) -> None:
        tfds = require("tensorflow_datasets", extra="tfds")

        self.name, self.split, self.data_dir = name, split, data_dir
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
            raise ValueError(
                f"TFDS dataset {name!r} split {split!r} is not available"
                f"{'' if data_dir is None else f' under {data_dir}'}: {error} "
                "(prepare it first, e.g. `tfds build NAME --file_format=array_record`; flaxcam downloads nothing)"
            ) from error
        info = getattr(self._data, "dataset_info", None) or tfds.builder(name, data_dir=data_dir).info
        features = info.features
        self.image_key = _detect_feature(features, "image", image_key)
        if self.image_key is None:
            raise ValueError(
                f"TFDS dataset {name!r} has no top-level Image feature (features: {list(features.keys())})"
            )
        self.label_key = _detect_feature(features, "label", label_key)
        self.class_names: tuple[str, ...] = tuple(features[self.label_key].names) if self.label_key is not None else ()
        if box_key and "/" in box_key:
            self.box_key: str | None = box_key
        else:
            self.box_key = _detect_feature(features, "box", box_key) if box_key else None
        self.mask_key = mask_key or None

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}: {len(self)} images, {len(self.class_names)} classes)"

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, len(self))
        record_id = f"tfds:{self.name}:{self.split}:{index}"
        try:
            example = self._data[index]
            label = -1 if self.label_key is None else int(example[self.label_key])
        except Exception as error:
            return Record(index, record_id, None, -1, f"{record_id}: cannot read record ({error})")
        try:
            value = example[self.image_key]
            if isinstance(value, (bytes, bytearray)):
                rgb = read_image_bytes(bytes(value), name=record_id)
            else:
                rgb = as_rgb_uint8(np.asarray(value))
        except (OSError, ValueError, TypeError, SyntaxError, EOFError, MemoryError) as error:
            return Record(index, record_id, None, label, f"{record_id}: cannot decode image ({error})")
        try:
            box = None if self.box_key is None else _tfds_box(_nested(example, self.box_key), rgb.shape[:2])
            mask = None if self.mask_key is None else _tfds_mask(_nested(example, self.mask_key))
        except (KeyError, IndexError, ValueError, TypeError) as error:
            return Record(index, record_id, rgb, label, f"{record_id}: cannot read ground truth ({error})")
        mask, mask_error = _checked_mask(mask, rgb)
        return Record(index, record_id, rgb, label, mask_error, box, mask)


def _nested(example: Any, key: str) -> Any:
    for part in key.split("/"):
        example = example[part]
    return example


def _tfds_mask(value: Any) -> np.ndarray:
    mask = np.asarray(value)
    return (mask[..., 0] if mask.ndim == 3 else mask) != 0


def _tfds_box(value: Any, size: tuple[int, int]) -> Box | None:
    """TFDS normalized ``(ymin, xmin, ymax, xmax)`` box(es) → one pixel box ``(x0, y0, x1, y1)`` (the
    enclosing one)."""
    boxes = np.asarray(value, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    height, width = size
    x0, y0 = boxes[:, 1].min() * width, boxes[:, 0].min() * height
    x1, y1 = boxes[:, 3].max() * width, boxes[:, 2].max() * height
    return (float(x0), float(y0), float(x1), float(y1))


SOURCE_KINDS: tuple[str, ...] = ("folder", "ham10000", "tfds", "npz")


def open_source(spec: str, exclude: Sequence[str | os.PathLike] = ()) -> ImageSource:
    """A source from a string: ``folder:PATH``, ``ham10000:PATH``, ``tfds:NAME[:SPLIT]`` (split
    default "train"; data dir from ``TFDS_DATA_DIR`` or TFDS's default) or ``npz:PATH``.

    ``exclude``: paths never read as data (an output folder inside ``folder:PATH``; see
    :class:`ImageFolderSource`); the other kinds list their records explicitly and ignore it."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind not in SOURCE_KINDS:
        raise ValueError(
            f"unknown source {spec!r}: expected one of folder:PATH, ham10000:PATH, tfds:NAME[:SPLIT], npz:PATH"
        )
    if kind == "folder":
        return ImageFolderSource(rest, exclude=exclude)
    if kind == "ham10000":
        return Ham10000Source(rest)
    if kind == "npz":
        return NpzSource(rest)
    name, _, split = rest.partition(":")
    return TfdsSource(name, split or "train", os.environ.get("TFDS_DATA_DIR"))

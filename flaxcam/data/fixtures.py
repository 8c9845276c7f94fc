"""Generated datasets in real layouts, for tests, smoke runs and the HAM10000 recipe (no download)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from flaxcam.data.sources import HAM10000_CLASSES, HAM10000_METADATA_COLUMNS

# A distinct lesion colour (RGB) and shape per class, so a small model can learn the fixture.
_LESION_COLOURS = {
    "akiec": (170, 60, 50),
    "bcc": (200, 120, 140),
    "bkl": (120, 80, 40),
    "df": (150, 100, 80),
    "mel": (40, 25, 20),
    "nv": (95, 55, 35),
    "vasc": (160, 20, 60),
}
_DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
_SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "scalp")


def _lesion_image(rng: np.random.Generator, dx: str, size: tuple[int, int]) -> np.ndarray:
    """Skin-coloured background with noise and a vignette, one elliptic lesion of the class colour."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    skin = np.array([225, 180, 160], np.float32) + rng.normal(0, 12, 3)
    image = skin + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    centre_y = rng.uniform(0.35, 0.65) * height
    centre_x = rng.uniform(0.35, 0.65) * width
    radius_y = rng.uniform(0.12, 0.3) * height
    radius_x = radius_y * rng.uniform(0.7, 1.4)
    distance = ((yy - centre_y) / radius_y) ** 2 + ((xx - centre_x) / radius_x) ** 2
    inside = np.clip(1.5 - distance, 0.0, 1.0)[..., None]
    colour = np.array(_LESION_COLOURS[dx], np.float32) + rng.normal(0, 8, 3)
    image = image * (1 - inside) + colour * inside
    vignette = np.hypot((yy - height / 2) / height, (xx - width / 2) / width)[..., None]
    image *= np.clip(1.15 - vignette, 0.0, 1.0)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_ham10000_fixture(
    root: str | os.PathLike,
    per_class: int = 3,
    seed: int = 0,
    size: tuple[int, int] = (450, 600),
) -> Path:
    """Write a small HAM10000-layout dataset under ``root`` and return ``root``.

    Layout (as distributed): ``HAM10000_metadata.csv`` with the columns ``lesion_id, image_id, dx,
    dx_type, age, sex, localization`` and ``ISIC_XXXXXXX.jpg`` images of ``size`` (height, width),
    450x600 by default, split over ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``.
    ``per_class`` images for each of the 7 classes (:data:`HAM10000_CLASSES`); every second image of a
    class shares the previous one's ``lesion_id`` (as in HAM10000, where a lesion has several images).
    Each image is a skin-coloured background with one elliptic lesion whose colour depends on the class.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    root = Path(root)
    parts = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
    for part in parts:
        part.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    lesion = 0
    total = per_class * len(HAM10000_CLASSES)
    for dx in HAM10000_CLASSES:
        for k in range(per_class):
            if k % 2 == 0:
                lesion += 1
            image_id = f"ISIC_{24306 + len(rows):07d}"
            part = parts[0] if len(rows) < (total + 1) // 2 else parts[1]
            Image.fromarray(_lesion_image(rng, dx, size)).save(part / f"{image_id}.jpg", quality=90)
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion:07d}",
                    "image_id": image_id,
                    "dx": dx,
                    "dx_type": _DX_TYPES[int(rng.integers(len(_DX_TYPES)))],
                    "age": f"{5 * int(rng.integers(2, 18))}.0",
                    "sex": ("male", "female")[int(rng.integers(2))],
                    "localization": _SITES[int(rng.integers(len(_SITES)))],
                }
            )
    # The real file is ordered by lesion, not by class; shuffle so readers do not rely on class order.
    order = rng.permutation(len(rows))
    with open(root / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(HAM10000_METADATA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    return root

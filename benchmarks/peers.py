"""flaxcam against the PyTorch peers on the same architecture, the same weights and the same batch.

    python -m benchmarks.peers [--models resnet18 resnet50] [--batch 16] [--size 224 224]
                               [--rounds 5] [--threads 2] [--out benchmarks/results]

Needs the ``parity`` extra (torch, torchvision, grad-cam, torchcam, captum). A torchvision ResNet with
random weights is converted to flax with ``flaxcam.models.load_torchvision_resnet``; every candidate
explains the same images at ``layer4`` for each image's top class. Candidates are timed interleaved,
round by round, after warm-up; torch runs with ``--threads`` intra-op threads and XLA on the same CPU.

What each candidate returns differs, and is stated in the output: flaxcam returns maps upsampled to the
input and normalized (plus the low-resolution maps); pytorch-grad-cam returns upsampled, normalized
maps; torchcam and captum return low-resolution maps (no upsampling). Writes JSON lines, a Markdown
table and a bar chart to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import flaxcam
from benchmarks.throughput import machine_info
from flaxcam.models import load_torchvision_resnet

FLAXCAM_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "layercam": "LayerCAM"}


def _import_torch(threads: int):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from torch_ref import define_torchvision_schemas

    import torch

    define_torchvision_schemas()
    torch.set_num_threads(threads)
    return torch


def candidates_for(name: str, batch: int, size: tuple[int, int], threads: int) -> dict[str, tuple[str, Callable]]:
    """``{label: (output description, zero-argument callable)}`` for one architecture."""
    torch = _import_torch(threads)
    import torchvision
    import pytorch_grad_cam
    from captum.attr import LayerGradCam
    from torchcam import methods as torchcam_methods

    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    model, variables = load_torchvision_resnet(reference.state_dict())
    images = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
    torch_images = torch.from_numpy(images)
    jax_images = jax.device_put(images.transpose(0, 2, 3, 1))
    jax_variables = jax.device_put(variables)
    with torch.no_grad():
        classes = reference(torch_images).argmax(1).tolist()

    forward = jax.jit(lambda v, x: model.apply(v, x))
    out: dict[str, tuple[str, Callable]] = {
        "flaxcam forward": ("logits", lambda: forward(jax_variables, jax_images)),
    }
    for method in FLAXCAM_METHODS:
        out[f"flaxcam {method}"] = (
            "maps at input size, normalized",
            lambda method=method: flaxcam.explain(model, jax_variables, jax_images, method=method, layer="layer4").maps,
        )

    def torch_forward():
        with torch.no_grad():
            return reference(torch_images)

    out["torch forward"] = ("logits", torch_forward)
    for method, class_name in FLAXCAM_METHODS.items():
        cam = getattr(pytorch_grad_cam, class_name)(model=reference, target_layers=[reference.layer4])
        out[f"pytorch-grad-cam {method}"] = ("maps at input size, normalized", lambda cam=cam: cam(torch_images, None))

    for method, class_name in (("gradcam", "GradCAM"), ("gradcam++", "GradCAMpp"), ("layercam", "LayerCAM")):
        def run_torchcam(class_name=class_name):
            with getattr(torchcam_methods, class_name)(reference, target_layer="layer4") as extractor:
                scores = reference(torch_images)
                return extractor(class_idx=classes, scores=scores)[0]

        out[f"torchcam {method}"] = ("low-resolution maps", run_torchcam)

    captum_cam = LayerGradCam(reference, reference.layer4)
    target = torch.tensor(classes)
    out["captum gradcam"] = ("low-resolution maps", lambda: captum_cam.attribute(torch_images, target=target))
    return out


def _block(value) -> None:
    if hasattr(value, "block_until_ready") or isinstance(value, jax.Array):
        jax.block_until_ready(value)
    # torch CPU results are ready when the call returns


def measure(candidates: dict[str, tuple[str, Callable]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Interleaved timings (seconds) per candidate."""
    for _, fn in candidates.values():
        for _ in range(warmup):
            _block(fn())
    timings: dict[str, list[float]] = {label: [] for label in candidates}
    for _ in range(rounds):
        for label, (_, fn) in candidates.items():
            start = time.perf_counter()
            _block(fn())
            timings[label].append(time.perf_counter() - start)
    return timings


def records_for(name: str, batch: int, size: tuple[int, int], rounds: int, threads: int) -> list[dict]:
    candidates = candidates_for(name, batch, size, threads)
    timings = measure(candidates, rounds)
    rate = {label: batch / statistics.median(values) for label, values in timings.items()}
    records = []
    for label, (output, _) in candidates.items():
        library, method = label.split(" ", 1)
        own_forward = rate["flaxcam forward"] if library == "flaxcam" else rate["torch forward"]
        pgc = rate.get(f"pytorch-grad-cam {method}")
        records.append(
            {
                "model": name,
                "library": library,
                "method": method,
                "output": output,
                "batch": batch,
                "size": list(size),
                "torch_threads": threads,
                "images_per_s": round(rate[label], 2),
                "ratio_to_own_forward": round(rate[label] / own_forward, 3),
                "flaxcam_speedup": round(rate[f"flaxcam {method}"] / rate[label], 3) if f"flaxcam {method}" in rate else None,
                "vs_pytorch_grad_cam": round(rate[label] / pgc, 3) if pgc else None,
                "median_s": round(statistics.median(timings[label]), 4),
                "rounds": rounds,
            }
        )
    return records


def markdown(records: list[dict]) -> str:
    lines = [
        "| model | library | method | images/s | ratio to own forward | flaxcam's speedup over it |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        speedup = "" if r["flaxcam_speedup"] is None or r["library"] == "flaxcam" else f"{r['flaxcam_speedup']:.2f}×"
        lines.append(
            f"| {r['model']} | {r['library']} | {r['method']} | {r['images_per_s']:.1f} | "
            f"{r['ratio_to_own_forward']:.2f} | {speedup} |"
        )
    return "\n".join(lines)


def chart(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    models = sorted({r["model"] for r in records})
    figure = Figure(figsize=(10, 4 * len(models)))
    for row, model in enumerate(models):
        ax = figure.add_subplot(len(models), 1, row + 1)
        subset = [r for r in records if r["model"] == model]
        labels = [f"{r['library']}\n{r['method']}" for r in subset]
        colors = ["tab:blue" if r["library"] == "flaxcam" else "tab:gray" for r in subset]
        ax.bar(range(len(subset)), [r["images_per_s"] for r in subset], color=colors)
        ax.set_xticks(range(len(subset)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("images/s")
        first = subset[0]
        ax.set_title(f"{model}, batch {first['batch']}, {first['size'][0]}x{first['size'][1]}, layer4")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    info = machine_info()
    records = []
    for name in args.models:
        for record in records_for(name, args.batch, tuple(args.size), args.rounds, args.threads):
            record.update(info)
            records.append(record)
            print(json.dumps(record), flush=True)
    tag = f"peers_{info['platform']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = markdown(records)
    (args.out / f"{tag}.md").write_text(table + "\n")
    chart(records, args.out / f"{tag}.png")
    print()
    print(table)


if __name__ == "__main__":
    main()

"""flaxcam's benchmark in one command: against the PyTorch peers, scaling curves, CPU backend options.

    python -m benchmarks [--quick] [--gpu] [--dtype bfloat16] [--out benchmarks/results]   # peers + scaling
    python -m benchmarks peers   [--models resnet18 resnet50 efficientnet_lite0] [--methods ...] [--batch 16]
    python -m benchmarks scaling [--model resnet18] [--batches 1 2 4 ...] [--sizes 224x224 450x600] [--devices 1 2 4]
    python -m benchmarks cpu-gap [--model resnet50] [--batch 16]
    python -m benchmarks nnx     [--models efficientnet_lite0 resnet18] [--batch 16]
    python -m benchmarks processes [--processes 1 2] [--images 2048]   # the audit over 1, 2, ... processes

``peers``: flaxcam's forward pass and every registered method, and — when the ``parity`` extra is
installed — torch's forward pass, pytorch-grad-cam, torchcam and captum (Grad-CAM, GradCAM++, HiResCAM,
LayerCAM where the library has them) on the same architecture and the same weights (torchvision
ResNets with seeded random weights saved once and loaded by both sides; EfficientNet-Lite0 with its
ImageNet weights), the same images, batch and thread count. ``scaling``: flaxcam's forward pass and
Grad-CAM over batch sizes, image sizes and the number of (emulated) devices, with the peak memory of
each configuration. ``processes``: the audit's images/s with 1, 2, ... processes on the same total cores
(:mod:`benchmarks.processes`), the multi-process overhead as a ratio. ``cpu-gap``: XLA CPU flags,
bfloat16, preprocessing inside the jitted step and torch thread settings, each in its own process,
against the default configuration. ``nnx``: the same
models as linen modules and as their NNX twins holding the same weights (forward, CAM, Grad-CAM; ratio
NNX / linen), and the pure explainer step ``jax.jit(flaxcam.explainer(...))`` (``<method>-step``) against
the jitted forward pass at batch 1 and at ``--batch`` (``explain``'s host work left out).

Each library runs in its own worker process; candidates are timed interleaved, round by round, after
warm-up, and images/s come from the median round (:mod:`flaxcam.bench.runner`). Writes
``<name>.jsonl`` (one record per measurement, with machine, versions, thread counts and load
average), ``<name>.md`` and ``<name>.png`` to ``--out``. Batched methods (ScoreCAM, AblationCAM,
Faster-ScoreCAM, SS-CAM, IS-CAM, SmoothGradCAM++: many forward passes per image) are left out unless
named with ``--methods``, and so is ``gradcam++exact`` (h·w·C third-order passes);
``python -m benchmarks.throughput`` measures the batched ones against their floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import processes
from flaxcam.bench import report, runner
from flaxcam.bench.command import PEER_METHODS, registry_methods

DEFAULT_MODELS = ("resnet18", "resnet50", "efficientnet_lite0")

#: XLA CPU options tried by ``cpu-gap`` (each in its own process, against the default).
XLA_CPU_OPTIONS = {  # flags that jaxlib 0.10.2 accepts (see benchmarks/README.md for how they were found)
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_fusions": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "opt_fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "ynn_fusions": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "2 devices": "--xla_force_host_platform_device_count=2",
}


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = text.lower().split("x")
        return int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must look like 224x224 (height x width), got {text!r}") from None


def _env(args: argparse.Namespace, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: the ``--allocator`` settings, then ``extra``."""
    base = dict(runner.TUNED_ALLOCATOR_ENV) if args.allocator == "tuned" else {}
    return {**base, **(extra or {})}


def _with_allocator(args: argparse.Namespace, allocator: str) -> argparse.Namespace:
    """``args`` with ``--allocator`` replaced (for a worker that runs with the other one)."""
    return argparse.Namespace(**{**vars(args), "allocator": allocator})


def _with_flags(*flags: str) -> dict[str, str]:
    existing = os.environ.get("XLA_FLAGS", "")
    return {"XLA_FLAGS": " ".join(filter(None, [existing, *flags]))}


# ---------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------


def run_peers(args: argparse.Namespace, weights_dir: Path) -> list[dict]:
    """flaxcam and the peers on each model, one interleaved measurement per model."""
    missing = {} if args.no_peers else runner.missing_peers()
    methods = args.methods or registry_methods()
    records: list[dict] = []
    for model in args.models:
        common = {"model": model, "batches": [args.batch], "size": list(args.size), "seed": 0, "warmup": args.warmup}
        weights = None if args.no_peers else runner.shared_weights(model, weights_dir)
        flax_env = _env(
            args,
            _with_flags(f"--xla_force_host_platform_device_count={args.cpu_devices}") if args.cpu_devices > 1 else None,
        )
        specs = [
            (
                "flaxcam",
                {
                    **common,
                    "library": "flaxcam",
                    "methods": methods,
                    "dtype": args.dtype,
                    "weights": str(weights) if weights else None,
                    "method_options": args.method_options,
                },
                flax_env,
                args.threads,
            )
        ]
        with_peers = not args.no_peers and not missing and model in runner.PEER_MODELS
        if with_peers:
            specs.append(
                (
                    "torch",
                    {
                        **common,
                        "library": "torch",
                        "methods": [m for m in methods if m in PEER_METHODS],
                        "threads": args.threads,
                        "weights": str(weights) if weights else None,
                        "dtype": "float32",
                        "method_options": args.method_options,
                    },
                    _env(args),
                    args.threads,
                )
            )
        print(
            f"[bench] peers: {model}, batch {args.batch}, {args.size[0]}x{args.size[1]}, {args.dtype}, "
            f"{len(methods)} flaxcam methods{', with the PyTorch peers' if with_peers else ''}",
            flush=True,
        )
        model_records = runner.run_workers(specs, args.rounds, memory=False)
        if not with_peers:
            reason = (
                "--no-peers"
                if args.no_peers
                else "; ".join(f"{k}: {v}" for k, v in missing.items())
                or f"no PyTorch peer for {model} (peers: {', '.join(runner.PEER_MODELS)})"
            )
            model_records.append(
                {
                    "status": "skipped",
                    "library": "peers",
                    "method": "*",
                    "model": model,
                    "batch": args.batch,
                    "size": list(args.size),
                    "reason": reason,
                }
            )
        records += report.add_ratios(model_records)
    return records


def run_scaling(args: argparse.Namespace) -> list[dict]:
    """flaxcam forward + ``--methods`` over batch sizes (one worker per image size and device count)."""
    records: list[dict] = []
    groups = [(size, 1, args.batches if size == args.sizes[0] else args.large_batches) for size in args.sizes]
    groups += [(args.sizes[0], count, [args.device_batch]) for count in args.devices if count != 1]
    for size, count, batches in groups:
        flags = _with_flags(f"--xla_force_host_platform_device_count={count}") if count != 1 else {}
        env = _env(args, flags)
        spec = {
            "library": "flaxcam",
            "model": args.scaling_model,
            "batches": list(batches),
            "size": list(size),
            "seed": 0,
            "methods": args.scaling_methods,
            "dtype": args.dtype,
            "warmup": args.warmup,
        }
        print(
            f"[bench] scaling: {args.scaling_model}, {size[0]}x{size[1]}, batches {list(batches)}, "
            f"{count} device(s), {args.dtype}",
            flush=True,
        )
        name = f"flaxcam-{size[0]}x{size[1]}-{count}dev"
        tuned = args.allocator == "tuned"
        group = runner.run_workers([(name, spec, env, args.threads)], args.scaling_rounds, memory=not tuned)
        peaks = {}
        if tuned:  # the tuned allocator keeps every freed buffer: peak memory from a default-allocator worker
            default_env = _env(_with_allocator(args, "default"), flags)
            peaks = runner.measure_peak_memory(f"{name}-memory", spec, default_env, args.threads)
        for record in group:
            record["emulated_devices"] = count if count != 1 else None
            if record.get("status") == "ok":
                record.update(peaks.get(f"{record['library']} {record['method']}@{record['batch']}", {}))
                if tuned:
                    record["memory_allocator"] = "default"
        records += report.add_ratios(group)
    return records


def run_cpu_gap(args: argparse.Namespace, weights_dir: Path) -> list[dict]:
    """The default XLA CPU configuration against each option, and torch thread settings, interleaved.

    The configurations run in groups of at most ``CPU_GAP_GROUP`` worker processes (each holds a
    ResNet-50 and, with the tuned allocator, keeps the memory it used: 16 at once did not fit in 24
    GiB); every group has its own ``xla default [k]`` worker, the baseline of that group's ratios."""
    weights = runner.shared_weights(args.model, weights_dir)
    common = {
        "model": args.model,
        "batches": [args.batch],
        "size": list(args.size),
        "seed": 0,
        "warmup": args.warmup,
        "weights": str(weights) if weights else None,
    }
    flax = {**common, "library": "flaxcam", "methods": ["gradcam"], "dtype": "float32"}
    other = "default" if args.allocator == "tuned" else "tuned"
    options = [(f"xla {name}", flax, _env(args, _with_flags(flags)), None) for name, flags in XLA_CPU_OPTIONS.items()]
    options.append(("xla bfloat16", {**flax, "dtype": "bfloat16"}, _env(args), None))
    options.append((f"xla {other} allocator", flax, _env(_with_allocator(args, other)), None))
    groups = [options[i : i + CPU_GAP_GROUP - 1] for i in range(0, len(options), CPU_GAP_GROUP - 1)]
    if not runner.missing_peers() and weights is not None:
        torch_spec = {
            **common,
            "library": "torch",
            "methods": ["gradcam"],
            "peers": ["pytorch-grad-cam"],
            "dtype": "float32",
        }
        cores = os.cpu_count() or 1
        torch_group = [
            (f"torch {threads} thread(s)", {**torch_spec, "threads": threads}, _env(args), None)
            for threads in sorted({1, cores})
        ]
        torch_group.append(
            (
                f"torch {cores} thread(s), {other} allocator",
                {**torch_spec, "threads": cores},
                _env(_with_allocator(args, other)),
                None,
            )
        )
        groups.append(torch_group)
    print(
        f"[bench] cpu-gap: {args.model}, batch {args.batch}, {sum(map(len, groups))} configurations "
        f"in {len(groups)} groups, each with its own default",
        flush=True,
    )
    records: list[dict] = []
    for index, group in enumerate(groups, start=1):
        baseline = f"xla default [{index}]"
        specs = [(baseline, {**flax, "preprocess": index == 1}, _env(args), None), *group]
        records += report.add_ratios(runner.run_workers(specs, args.rounds, memory=False), baseline_worker=baseline)
    return records


def run_nnx(args: argparse.Namespace) -> list[dict]:
    """Linen and the NNX twin on the same weights, interleaved: forward, CAM and Grad-CAM through
    ``explain`` and through the jitted explainer step, at batch 1 and ``--batch``."""
    records: list[dict] = []
    for model in args.models:
        spec = {
            "library": "flaxcam",
            "model": model,
            "batches": sorted({1, args.batch}),
            "size": list(args.size),
            "seed": 0,
            "warmup": args.warmup,
            "methods": list(args.methods or NNX_METHODS),
            "dtype": "float32",
            "step": True,
        }
        print(f"[bench] nnx: {model}, batches 1 and {args.batch}, {args.size[0]}x{args.size[1]}", flush=True)
        specs = [("linen", spec, _env(args), args.threads), ("nnx", {**spec, "api": "nnx"}, _env(args), args.threads)]
        records += report.add_ratios(runner.run_workers(specs, args.rounds, memory=False), baseline_worker="linen")
    return records


#: Methods of the ``nnx`` comparison (the issue's: CAM and Grad-CAM).
NNX_METHODS = ("cam", "gradcam")

#: Worker processes per cpu-gap group (the default included).
CPU_GAP_GROUP = 6


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


QUICK = {
    "models": ["resnet18"],
    "methods": ["cam", "gradcam", "gradcam++", "hirescam", "layercam"],
    "batch": 8,
    "rounds": 3,
    "scaling_rounds": 2,
    "batches": [1, 8, 32],
    "large_batches": [1, 4],
    "devices": [1, 2],
}
GPU = {
    "models": ["resnet50"],
    "batch": 256,
    "rounds": 10,
    "scaling_rounds": 5,
    "dtype": "bfloat16",
    "batches": [1, 8, 32, 128, 256, 512, 1024],
    "large_batches": [1, 8, 32, 128],
    "devices": [1],
    "scaling_model": "resnet50",
    "threads": None,
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for .jsonl/.md/.png")
    parser.add_argument("--name", default=None, help="file name stem (default: <subcommand>_<platform>[_quick])")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate (the first compiles)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU cores for every worker (CPU affinity) and torch intra-op threads (default: all)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="flaxcam's computation dtype")
    parser.add_argument("--quick", action="store_true", help="a small configuration (about 3 minutes on 2 cores)")
    parser.add_argument(
        "--gpu", action="store_true", help="the GPU-sized configuration (ResNet-50, large batches, bfloat16)"
    )
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc malloc settings of every worker, flaxcam and torch alike: 'tuned' (default) reuses "
        "freed buffers instead of page-faulting them in again (flaxcam.bench.runner.TUNED_ALLOCATOR_ENV); "
        "'default' leaves glibc's defaults",
    )


def _add_peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="flaxcam methods (default: every registered one except the batched ones and gradcam++exact)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 16 (--gpu: 256)")
    parser.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--no-peers", action="store_true", help="flaxcam only, even when the peers are installed")
    parser.add_argument(
        "--method-options",
        type=json.loads,
        default=None,
        help="method options as JSON, each to the methods that have it, e.g. '{\"num_scales\": 3}' for SESS "
        "(the peers get the same values)",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="split the CPU into N XLA devices for flaxcam (XLA_FLAGS=--xla_force_host_platform_device_count=N; "
        "the batch is sharded over them, forward pass included); the peers are unchanged",
    )


def _add_scaling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scaling-model", "--model", dest="scaling_model", default=None, help="default resnet18 (--gpu: resnet50)"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="batch sizes at the first size (default 1 2 4 ... 128)"
    )
    parser.add_argument(
        "--large-batches", type=int, nargs="+", default=None, help="batch sizes at the other sizes (default 1 4 16 32)"
    )
    parser.add_argument(
        "--sizes", type=_size, nargs="+", default=[(224, 224), (450, 600)], help="HxW, e.g. 224x224 450x600"
    )
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="emulated device counts (default 1 2 4)")
    parser.add_argument("--device-batch", type=int, default=16, help="batch size of the device-count curve")
    parser.add_argument("--scaling-methods", dest="scaling_methods", nargs="+", default=["gradcam"])
    parser.add_argument(
        "--scaling-rounds", type=int, default=None, help="timed rounds per scaling candidate (default 3)"
    )


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from --quick / --gpu presets, then the defaults."""
    preset = {**(QUICK if args.quick else {}), **(GPU if args.gpu else {})}
    defaults = {
        "models": list(DEFAULT_MODELS),
        "batch": 16,
        "rounds": 5,
        "dtype": "float32",
        "batches": [1, 2, 4, 8, 16, 32, 64, 128],
        "large_batches": [1, 4, 16, 32],
        "devices": [1, 2, 4],
        "scaling_model": "resnet18",
        "threads": None,
        "methods": None,
        "scaling_rounds": 3,
    }
    for name, default in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, default))
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    everything = sub.add_parser("all", help="peers and scaling (the default)")
    peers = sub.add_parser("peers", help="flaxcam against pytorch-grad-cam, torchcam and captum")
    scaling = sub.add_parser("scaling", help="batch size, image size and device count curves with peak memory")
    gap = sub.add_parser("cpu-gap", help="XLA CPU options, bfloat16, fused preprocessing and torch threads")
    nnx = sub.add_parser("nnx", help="NNX twins against linen on the same weights, and the jitted explainer step")
    processes_parser = sub.add_parser(
        "processes", help="the audit over 1, 2, ... processes on the same total cores (multi-process overhead)"
    )
    processes.add_arguments(processes_parser)
    for p in (parser, everything, peers, scaling, gap, nnx):
        _add_common(p)
    for p in (parser, everything, peers):
        _add_peers(p)
    for p in (parser, everything, scaling):
        _add_scaling(p)
    gap.add_argument("--model", default="resnet50")
    gap.add_argument("--batch", type=int, default=16)
    gap.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    nnx.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18"])
    nnx.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(NNX_METHODS)}")
    nnx.add_argument("--batch", type=int, default=16)
    nnx.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    return parser


def _write(
    part: str,
    records: list[dict],
    args: argparse.Namespace,
    parts: int,
    command_line: str,
    machine: dict,
    started: float,
) -> list[Path]:
    platform = next((r["platform"] for r in records if r.get("platform")), "cpu")
    platform = "gpu" if platform in ("gpu", "cuda") else platform
    stem = (
        f"{part}_{platform}" + ("_quick" if args.quick else "") + ("_" + args.dtype if args.dtype != "float32" else "")
    )
    if args.name:
        stem = f"{args.name}_{part}" if parts > 1 else args.name
    for record in records:
        record.update({"benchmark": part, "command": command_line, "machine": machine})
    return report.write(part, records, args.out, stem, command_line, machine, time.time() - started)


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the benchmark; returns the files written."""
    argv = sys.argv[1:] if argv is None else argv
    args = _resolve(build_parser().parse_args(argv))
    command = args.command or "all"
    command_line = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    if command == "processes":
        return processes.run(args, command_line)
    machine = runner.machine_info()
    started = time.time()
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="flaxcam-bench-") as scratch:
        weights_dir = Path(scratch)
        cache = os.environ.get("FLAXCAM_CACHE")
        os.environ["FLAXCAM_CACHE"] = cache or str(weights_dir / "cache")  # the workers' converted weights
        try:
            parts = {
                "all": ("peers", "scaling"),
                "peers": ("peers",),
                "scaling": ("scaling",),
                "cpu-gap": ("cpu_gap",),
                "nnx": ("nnx",),
            }[command]
            for part in parts:  # each part's files are written as soon as it is done
                if part == "peers":
                    records = run_peers(args, weights_dir)
                elif part == "scaling":
                    records = run_scaling(args)
                elif part == "nnx":
                    records = run_nnx(args)
                else:
                    records = run_cpu_gap(args, weights_dir)
                written += _write(part, records, args, len(parts), command_line, machine, started)
        finally:
            if cache is None:
                del os.environ["FLAXCAM_CACHE"]
    print(f"[bench] done in {time.time() - started:.0f} s: " + ", ".join(str(p) for p in written), flush=True)
    return written


if __name__ == "__main__":
    main()

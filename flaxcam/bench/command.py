"""``flaxcam bench``: explanation speed on your own model, batch sizes and devices, in one run.

:func:`run` starts a flaxcam worker process (and, with ``peers=True``, a PyTorch one) through
:mod:`flaxcam.bench.runner`, times the model's jitted forward pass and each method at each batch size
interleaved round by round, then adds what the records are read with: the ratio to the forward pass,
latency at batch 1, the score-based methods' floor and, with ``profile=``, the time split.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flaxcam.bench import models, report, runner

#: The PyTorch peers' methods (pytorch-grad-cam, torchcam, captum have some of them each).
PEER_METHODS = ("gradcam", "gradcam++", "hirescam", "layercam", "sess", "dff")
#: Per-image methods left out of the default run for their cost: ``gradcam++exact`` runs h·w·C
#: third-order forward-mode passes of the network after the layer (about 100,000 at ResNet-50's layer4).
EXPENSIVE_METHODS = ("gradcam++exact",)
DTYPES = ("float32", "bfloat16")
DEFAULT_BATCHES = (1, 8)


def registry_methods() -> list[str]:
    """The registered methods except the batched ones (ScoreCAM, AblationCAM, ...: many forward passes
    per image), :data:`EXPENSIVE_METHODS` and the attention methods (LeGrad: ViT blocks, not the CNN
    layers benchmarked here): what runs when no method is named."""
    import flaxcam  # reads the registry only; nothing runs on a device in this process

    return [
        name
        for name, method in flaxcam.METHODS.items()
        if not method.batched and not method.attention_layers and name not in EXPENSIVE_METHODS
    ]


def resolve_methods(methods: str | Sequence[str] | None) -> list[str]:
    """``None`` → :func:`registry_methods`; ``"all"`` → every registered method; ``"a,b"`` or a list →
    those names, unknown ones kept (the worker records them as not measured, the others still run)."""
    import flaxcam

    if methods is None:
        return registry_methods()
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = [name for name in names if name]
    if names == ["all"]:
        return list(flaxcam.METHODS)
    if not names:
        raise ValueError(f"name at least one method: all, or some of {', '.join(flaxcam.METHODS)}")
    return list(dict.fromkeys(names))


def parse_ints(text: str | Sequence[int], what: str, count: int | None = None) -> tuple[int, ...]:
    """``"1,8,64"`` → ``(1, 8, 64)`` (positive integers), with a clear error naming ``what``."""
    try:
        values = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values) or (count is not None and len(values) != count):
        shape = f"{count} comma-separated positive integers" if count else "comma-separated positive integers"
        raise ValueError(f"{what} must be {shape}, got {text!r}")
    return values


def parse_devices(devices: int | str | None) -> int | None:
    """``None`` / ``"all"`` → every device (None); ``N`` → the first N (on a CPU, N emulated devices)."""
    if devices is None or str(devices) == "all":
        return None
    value = parse_ints(str(devices), "--devices (N or all)", 1)[0]
    return value


def peer_reason(name: str | None, weights: str | None, factory: str | None) -> str | None:
    """Why the PyTorch peers cannot run on this model (None when they can)."""
    missing = runner.missing_peers()
    if factory is not None:
        return "no PyTorch peer for a user model (peers: torchvision ResNets and efficientnet_lite0)"
    if weights is not None and Path(weights).suffix not in (".pth", ".pt"):  # what the torch worker loads
        return (
            "no PyTorch peer for these weights (peers: torchvision .pth/.pt ResNet checkpoints and efficientnet_lite0)"
        )
    if weights is None and name not in (None, "efficientnet_lite0") and name not in runner.PEER_MODELS:
        return f"no PyTorch peer for {name} (peers: {', '.join(runner.PEER_MODELS)})"
    if missing:
        return "; ".join(f"{library}: {reason}" for library, reason in missing.items())
    if weights is None and name in (None, "efficientnet_lite0"):
        import importlib.util

        if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
            return "efficientnet_lite_pytorch is not installed (pip install 'flaxcam[parity]')"
    return None


def _check_method_options(methods: Sequence[str], options: Mapping[str, Any]) -> None:
    """Every option must belong to at least one of the methods run (a typo would otherwise be ignored)."""
    import flaxcam

    known = {key for name in methods if name in flaxcam.METHODS for key in flaxcam.METHODS[name].options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"method options {', '.join(unknown)} belong to none of {', '.join(methods)}; "
            f"their options: {', '.join(sorted(known)) or 'none'}"
        )


def _xla_env(devices: int | None) -> dict[str, str]:
    """The flaxcam worker's environment: with N > 1 devices, N host devices for XLA's CPU backend (on
    an accelerator the flag changes nothing and the first N accelerators are used)."""
    if not devices or devices == 1:
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def run(
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    methods: str | Sequence[str] | None = None,
    layer: str | None = None,
    batches: str | Sequence[int] = DEFAULT_BATCHES,
    size: str | Sequence[int] | None = None,
    dtype: str = "float32",
    devices: int | str | None = None,
    rounds: int = 5,
    warmup: int = 1,
    out: str | os.PathLike[str] | None = None,
    profile: str | os.PathLike[str] | None = None,
    peers: bool = False,
    threads: int | None = None,
    chunk_size: int = 32,
    method_options: Mapping[str, Any] | None = None,
    name: str | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark ``methods`` on a model; returns one record per measurement (and per method not
    measured, with its reason), prints the table and, with ``out``, writes ``<name>.jsonl``, ``.md``
    and ``.png`` there.

    Args:
      model: a registered model name (``resnet50``, ``small_cnn``, ...: seeded random weights) or a user
        model ``"package.module:factory"`` (the function returns ``(model, variables)`` for linen, or an
        ``nnx.Module``); default: the pretrained EfficientNet-Lite0.
      weights: a flaxcam bundle or a torchvision ResNet checkpoint (``.pth``).
      methods: ``"all"``, ``"gradcam,scorecam"`` or a list; default: every method with about one forward
        pass per image.
      layer: the explained layer (default: the model's, else the last spatial one).
      batches: batch sizes (``"1,8,64"``); size: ``"H,W"`` (default: the model's input size, else 224,224).
      dtype: ``float32`` or ``bfloat16`` (the module's ``dtype`` when it has one, else the images').
      devices: ``N`` or ``"all"`` (default): shard each batch over the first N devices; on a CPU, N
        emulated devices.
      rounds, warmup: timed rounds (median and best reported) and untimed calls (the first compiles).
      profile: a folder: one ``jax.profiler`` trace per method, and the time split (forward, backward to
        the layer, method, post-processing) in the records and the table.
      peers: also time pytorch-grad-cam, torchcam and captum on the same torchvision model and weights.
      threads: CPU cores for every worker (default: all this process may use).
      chunk_size: masked images per forward pass of the score-based methods (their memory bound).
      method_options: method options (``{"num_samples": 8}``), each given to the methods that have it.
      name: the file name stem under ``out`` (default ``bench_<platform>``).
    """
    factory = model if model is not None and ":" in model else None
    model_name = None if factory else model
    weights = None if weights is None else str(weights)
    models.check_source(model_name, weights, factory)
    method_names = resolve_methods(methods)
    batch_sizes = tuple(sorted(set(parse_ints(batches, "--batch"))))
    image_size = None if size is None else parse_ints(size, "--size (H,W)", 2)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device_count = parse_devices(devices)
    if rounds < 1 or warmup < 0 or chunk_size < 1:
        raise ValueError(
            f"--rounds and --chunk-size must be >= 1 and --warmup >= 0, got {rounds}, {chunk_size}, {warmup}"
        )
    _check_method_options(method_names, method_options or {})
    started = time.time()
    command = (
        command
        or "flaxcam.bench.run("
        + ", ".join(
            f"{k}={v!r}"
            for k, v in {"model": model, "weights": weights, "methods": methods, "batches": batches}.items()
            if v
        )
        + ")"
    )
    label = models.describe(model_name, weights, factory)
    no_peers = peer_reason(model_name, weights, factory) if peers else None
    if peers and no_peers is None and image_size is None:
        image_size = models.DEFAULT_SIZE  # both workers on the same images
    with tempfile.TemporaryDirectory(prefix="flaxcam-bench-") as scratch:
        common = {
            "model": model_name,
            "label": label,
            "batches": list(batch_sizes),
            "size": list(image_size) if image_size else None,
            "seed": 0,
            "warmup": warmup,
        }
        if peers and no_peers is None and weights is None and model_name and model_name.startswith("resnet"):
            weights = str(runner.shared_weights(model_name, Path(scratch)))  # seeded, read by both workers
        specs = [
            (
                "flaxcam",
                {
                    **common,
                    "library": "flaxcam",
                    "weights": weights,
                    "factory": factory,
                    "layer": layer,
                    "methods": method_names,
                    "dtype": dtype,
                    "devices": device_count,
                    "split": profile is not None,
                    "chunk_size": chunk_size,
                    "method_options": dict(method_options or {}),
                },
                _xla_env(device_count),
                threads,
            )
        ]
        if peers and no_peers is None:
            specs.append(
                (
                    "torch",
                    {
                        **common,
                        "library": "torch",
                        "weights": weights,
                        "dtype": "float32",
                        "size": list(image_size or models.DEFAULT_SIZE),
                        "methods": [m for m in method_names if m in PEER_METHODS],
                        "threads": threads or len(os.sched_getaffinity(0)),
                        "method_options": dict(method_options or {}),
                    },
                    {},
                    threads,
                )
            )
        print(
            f"[bench] {label}: {', '.join(method_names)} at batch {', '.join(map(str, batch_sizes))}, {dtype}, "
            f"{rounds} round(s)" + (", with the PyTorch peers" if len(specs) > 1 else ""),
            file=sys.stderr,
            flush=True,
        )
        records = runner.run_workers(specs, rounds, memory=True, profile=None if profile is None else Path(profile))
    if peers and no_peers is not None:
        records.append(
            {"status": "skipped", "library": "peers", "method": "*", "model": label, "batch": None, "reason": no_peers}
        )
    records = report.derive(report.add_ratios(records))
    machine = runner.machine_info()
    for record in records:
        record.update({"benchmark": "bench", "command": command, "machine": machine})
    if out is None:
        print(report.markdown("bench", records, command, machine, time.time() - started), flush=True)
    else:
        platform = next((r["platform"] for r in records if r.get("platform")), "cpu")
        report.write(
            "bench",
            records,
            Path(out),
            name or f"bench_{'gpu' if platform in ('gpu', 'cuda') else platform}",
            command,
            machine,
            time.time() - started,
        )
    return records


def command_line(options: dict[str, Any]) -> str:
    """``flaxcam bench --opt value ...`` for the options given (None and False left out), for the records."""
    parts = ["flaxcam", "bench"]
    for key, value in options.items():
        if value is None or value is False:
            continue
        parts.append(f"--{key.replace('_', '-')}")
        if value is not True:
            parts.append(shlex.quote(str(value)))
    return " ".join(parts)

"""A benchmark worker: one process that builds timing candidates for one library and runs them on request.

The driver (:mod:`benchmarks.runner`) starts one worker per library and configuration — flaxcam in one
process, the PyTorch peers in another, each with its own environment (``XLA_FLAGS``, CPU affinity,
thread count) — and asks them, round by round and in turn, to run one candidate each. Keeping the
libraries in separate processes stops one library's thread pool from slowing the other down (on this
machine torch's backward pass through depthwise convolutions ran 50× slower with 2 threads after XLA's
thread pool had run in the same process) and lets every configuration set its own ``XLA_FLAGS``.

Protocol: the worker is started as ``python -m benchmarks.worker SPEC_JSON``; it answers on its original
stdout (the library's own prints go to stderr) one JSON line per request read from stdin:

* at start: ``{"ready": true, "candidates": [...], "errors": {...}, "info": {...}}``;
* ``{"op": "run", "key": K}`` → ``{"seconds": s}`` (one call, ending when the result is ready);
* ``{"op": "memory", "key": K}`` → ``{"peak_rss_bytes", "base_rss_bytes", "device_peak_bytes"}``: the
  host peak resident set while the candidate runs once (the kernel's peak counter is reset first) and
  the device's ``peak_bytes_in_use`` on accelerators (a high-water mark since the process started);
* ``{"op": "quit"}``.

A candidate that fails while being built or warmed up is reported under ``errors`` (its message) and
left out; the others still run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The peers' classes for each method (pytorch-grad-cam 1.5.7, torchcam 0.5, captum 0.9).
PYTORCH_GRAD_CAM = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "layercam": "LayerCAM"}
TORCHCAM = {"gradcam": "GradCAM", "gradcam++": "GradCAMpp", "layercam": "LayerCAM"}
CAPTUM = {"gradcam": "LayerGradCam"}


def candidate_key(library: str, method: str, batch: int) -> str:
    """``"library method@batch"``, the name a candidate is run by."""
    return f"{library} {method}@{batch}"


def _images(batch: int, size: tuple[int, int], seed: int):
    """The same standard-normal NCHW float32 images in every worker (numpy only)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # no /proc: the process-lifetime peak
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


# ---------------------------------------------------------------------------------------------------
# flaxcam
# ---------------------------------------------------------------------------------------------------


def _flax_model(spec: dict[str, Any]):
    """``(model, variables, layer)`` of the spec's architecture: the shared weights file when given."""
    import jax.numpy as jnp

    from flaxcam import models

    dtype = jnp.dtype(spec["dtype"])
    name = spec["model"]
    if name.startswith("resnet") and spec.get("weights"):
        model, variables = models.load_torchvision_resnet(spec["weights"], dtype=dtype)
        return model, variables, "layer4"
    if name == "efficientnet_lite0":
        _, variables, meta = models.pretrained_efficientnet_lite0()
        return models.efficientnet_lite0(num_classes=1000, dtype=dtype), variables, meta["target_layer"]
    model = models.create_model(name, dtype=dtype)
    variables = models.init_variables(model, (1, *spec["size"], 3), seed=spec.get("seed", 0))
    return model, variables, None  # the default layer: the last spatial one


def flax_candidates(spec: dict[str, Any]) -> tuple[dict[str, Callable], dict[str, str], dict]:
    """Forward-only and every requested method for each batch size, on device-resident inputs."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import flaxcam

    model, variables, layer = _flax_model(spec)
    # Several (e.g. emulated CPU) devices: the forward pass is sharded over the batch like explain's.
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    forward = jax.jit(lambda v, x: model.apply(v, x))
    candidates: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    for batch in spec["batches"]:
        sharding = NamedSharding(mesh, PartitionSpec("batch" if batch % len(jax.devices()) == 0 else None))
        images = jax.device_put(_images(batch, tuple(spec["size"]), spec.get("seed", 0)).transpose(0, 2, 3, 1), sharding)
        candidates[candidate_key("flaxcam", "forward", batch)] = lambda images=images: forward(variables, images)
        for method in spec["methods"]:
            if method not in flaxcam.METHODS:
                errors[candidate_key("flaxcam", method, batch)] = (
                    f"unknown method {method!r}: valid names are {', '.join(flaxcam.METHODS)}"
                )
                continue
            # FullGrad-like methods read every biased layer and take no layer=
            method_layer = None if flaxcam.METHODS[method].bias_layers else layer
            candidates[candidate_key("flaxcam", method, batch)] = (
                lambda images=images, method=method, method_layer=method_layer: flaxcam.explain(
                    model, variables, images, method=method, layer=method_layer, chunk_size=spec.get("chunk_size", 32)
                ).maps
            )
    if spec.get("preprocess"):
        _add_preprocessing(candidates, spec, forward, variables)
    device = jax.devices()[0]
    info = {
        "platform": device.platform,
        "device": device.device_kind,
        "devices": len(jax.devices()),
        "layer": layer or "default (last spatial)",
    }
    return candidates, errors, info


def _add_preprocessing(candidates: dict[str, Callable], spec: dict[str, Any], forward: Callable, variables: Any) -> None:
    """Forward passes that start from uint8 images on the host: normalized with NumPy then copied
    (``forward+host_preprocess``), or copied as uint8 and normalized inside the jitted step
    (``forward+fused_preprocess``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    mean = np.asarray([0.485, 0.456, 0.406], np.float32) * 255
    std = np.asarray([0.229, 0.224, 0.225], np.float32) * 255

    @jax.jit
    def fused(v, raw):
        return forward(v, (raw.astype(jnp.float32) - mean) / std)

    for batch in spec["batches"]:
        raw = np.random.default_rng(spec.get("seed", 0)).integers(0, 256, (batch, *spec["size"], 3), dtype=np.uint8)
        candidates[candidate_key("flaxcam", "forward+host_preprocess", batch)] = lambda raw=raw: forward(
            variables, jax.device_put((raw.astype(np.float32) - mean) / std)
        )
        candidates[candidate_key("flaxcam", "forward+fused_preprocess", batch)] = lambda raw=raw: fused(
            variables, jax.device_put(raw)
        )


def _flax_block(value: Any) -> None:
    import jax

    jax.block_until_ready(value)


def _flax_device_peak() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


# ---------------------------------------------------------------------------------------------------
# PyTorch peers
# ---------------------------------------------------------------------------------------------------


def _import_torch(threads: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from torch_ref import define_torchvision_schemas

    define_torchvision_schemas()
    torch.set_num_threads(threads)
    return torch


def _torch_model(torch, spec: dict[str, Any]):
    """``(model, target_layer_module)`` on the same weights as the flaxcam worker."""
    name = spec["model"]
    if name.startswith("resnet"):
        import torchvision

        model = getattr(torchvision.models, name)()
        model.load_state_dict(torch.load(spec["weights"], weights_only=True))
        return model.eval(), model.layer4
    if name == "efficientnet_lite0":
        import efficientnet_lite_pytorch

        from flaxcam.models.pretrained import efficientnet_lite0_weights_path

        reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
        reference.load_state_dict(torch.load(efficientnet_lite0_weights_path(), weights_only=True))

        class Wrapped(torch.nn.Module):
            """The reference's modules with the activated head (flaxcam's ``head`` layer) as one module,
            as in tests/parity/test_efficientnet_parity.py (same logits as the reference)."""

            def __init__(self, ref):
                super().__init__()
                self.stem = torch.nn.Sequential(ref._conv_stem, ref._bn0, torch.nn.ReLU6())
                self.blocks = ref._blocks
                self.head = torch.nn.Sequential(ref._conv_head, ref._bn1, torch.nn.ReLU6())
                self.fc = ref._fc

            def forward(self, x):
                x = self.stem(x)
                for block in self.blocks:
                    x = block(x)
                return self.fc(self.head(x).mean(dim=(2, 3)))

        model = Wrapped(reference).eval()
        return model, model.head
    raise ValueError(f"no PyTorch peer for model {name!r}: peers run on resnet18, resnet50, efficientnet_lite0")


def torch_candidates(spec: dict[str, Any]) -> tuple[dict[str, Callable], dict[str, str], dict]:
    """torch's no-grad forward and the peers' methods (those of ``spec['methods']`` they have)."""
    torch = _import_torch(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, target_layer = _torch_model(torch, spec)
    model = model.to(device)
    layer_name = next(name for name, module in model.named_modules() if module is target_layer)
    candidates: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    libraries = set(spec.get("peers", ("pytorch-grad-cam", "torchcam", "captum")))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for batch in spec["batches"]:
        images = torch.from_numpy(_images(batch, tuple(spec["size"]), spec.get("seed", 0))).to(device)
        with torch.no_grad():
            classes = model(images).argmax(1).tolist()

        def forward(images=images):
            with torch.no_grad():
                out = model(images)
            sync()
            return out

        candidates[candidate_key("torch", "forward", batch)] = forward
        for method in spec["methods"]:
            if "pytorch-grad-cam" in libraries and method in PYTORCH_GRAD_CAM:
                import pytorch_grad_cam

                cam = getattr(pytorch_grad_cam, PYTORCH_GRAD_CAM[method])(model=model, target_layers=[target_layer])
                candidates[candidate_key("pytorch-grad-cam", method, batch)] = lambda cam=cam, images=images: cam(images, None)
            if "torchcam" in libraries and method in TORCHCAM:
                from torchcam import methods as torchcam_methods

                def run_torchcam(class_name=TORCHCAM[method], images=images, classes=classes):
                    with getattr(torchcam_methods, class_name)(model, target_layer=layer_name) as extractor:
                        maps = extractor(class_idx=classes, scores=model(images))[0]
                    sync()
                    return maps

                candidates[candidate_key("torchcam", method, batch)] = run_torchcam
            if "captum" in libraries and method in CAPTUM:
                from captum.attr import LayerGradCam

                captum_cam = LayerGradCam(model, target_layer)
                target = torch.tensor(classes, device=device)

                def run_captum(captum_cam=captum_cam, images=images, target=target):
                    maps = captum_cam.attribute(images, target=target)
                    sync()
                    return maps

                candidates[candidate_key("captum", method, batch)] = run_captum
    info = {
        "platform": device,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "layer": layer_name,
    }
    return candidates, errors, info


# ---------------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------------


def _warm_up(candidates: dict[str, Callable], block: Callable, warmup: int, errors: dict[str, str]) -> dict[str, float]:
    """Call each candidate ``warmup`` times (the first compiles); drop those that fail. Returns the
    first call's seconds (compilation included) per candidate."""
    first: dict[str, float] = {}
    for key in list(candidates):
        try:
            for index in range(max(1, warmup)):
                start = time.perf_counter()
                block(candidates[key]())
                if index == 0:
                    first[key] = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 (a peer without this method, out of memory, ...: recorded, not fatal)
            errors[key] = f"{type(err).__name__}: {err}".strip()[:500]
            del candidates[key]
            print(traceback.format_exc(), file=sys.stderr)
    return first


def serve(spec: dict[str, Any], requests, answer: Callable[[dict], None]) -> None:
    """Build the spec's candidates, warm them up, then answer ``requests`` (an iterable of lines)."""
    if spec["library"] == "flaxcam":
        candidates, errors, info = flax_candidates(spec)
        block, device_peak = _flax_block, _flax_device_peak
    else:
        candidates, errors, info = torch_candidates(spec)
        block, device_peak = (lambda value: None), (lambda: None)  # torch candidates synchronize themselves
    first_call = _warm_up(candidates, block, spec.get("warmup", 1), errors)
    info.update(
        {
            "first_call_s": {key: round(value, 3) for key, value in first_call.items()},
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "malloc_env": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
            "pid": os.getpid(),
        }
    )
    answer({"ready": True, "candidates": list(candidates), "errors": errors, "info": info})
    for line in requests:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        fn = candidates[request["key"]]
        if request["op"] == "run":
            start = time.perf_counter()
            block(fn())
            answer({"seconds": time.perf_counter() - start})
        elif request["op"] == "memory":
            base = (_status_kib("VmRSS") or 0) * 1024
            _reset_peak_rss()
            block(fn())
            answer({"peak_rss_bytes": _peak_rss_bytes(), "base_rss_bytes": base, "device_peak_bytes": device_peak()})
        else:
            answer({"error": f"unknown op {request['op']!r}: valid ops are run, memory, quit"})


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the protocol

    def answer(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    spec = json.loads(sys.argv[1])
    try:
        serve(spec, sys.stdin, answer)
    except Exception as err:  # noqa: BLE001 (reported to the driver, which records it)
        traceback.print_exc()
        answer({"fatal": f"{type(err).__name__}: {err}"[:1000]})
        sys.exit(1)


if __name__ == "__main__":
    main()

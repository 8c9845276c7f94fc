"""A benchmark worker: one process that builds timing candidates for one library and runs them on request.

The driver (:mod:`flaxcam.bench.runner`) starts one worker per library and configuration — flaxcam in one
process, the PyTorch peers in another, each with its own environment (``XLA_FLAGS``, CPU affinity,
thread count) — and asks them, round by round and in turn, to run one candidate each. Keeping the
libraries in separate processes stops one library's thread pool from slowing the other down (on this
machine torch's backward pass through depthwise convolutions ran 50× slower with 2 threads after XLA's
thread pool had run in the same process) and lets every configuration set its own ``XLA_FLAGS``.

Protocol: the worker is started as ``python -m flaxcam.bench.worker SPEC_JSON``; it answers on its original
stdout (the library's own prints go to stderr) one JSON line per request read from stdin:

* at start: ``{"ready": true, "candidates": [...], "errors": {...}, "info": {...}}``;
* ``{"op": "run", "key": K}`` → ``{"seconds": s}`` (one call, ending when the result is ready);
* ``{"op": "memory", "key": K}`` → ``{"peak_rss_bytes", "base_rss_bytes", "device_peak_bytes"}``: the
  host peak resident set while the candidate runs once (the kernel's peak counter is reset first) and
  the device's ``peak_bytes_in_use`` on accelerators (a high-water mark since the process started);
* ``{"op": "profile", "key": K, "dir": D}`` → ``{"files": [...]}``: one call recorded by
  ``jax.profiler.trace(D)`` (flaxcam workers);
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
PYTORCH_GRAD_CAM = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
}
#: pytorch-grad-cam's SESS keyword arguments that flaxcam's ``sess`` options share (same names, same
#: defaults); ``base`` names the base method (a key of :data:`PYTORCH_GRAD_CAM`).
SESS_OPTIONS = ("num_scales", "scale_step_ratio", "window_size", "step_size", "pre_filter_ratio", "theta", "pool")
TORCHCAM = {"gradcam": "GradCAM", "gradcam++": "GradCAMpp", "layercam": "LayerCAM"}
CAPTUM = {"gradcam": "LayerGradCam"}


def candidate_key(library: str, method: str, batch: int) -> str:
    """``"library method@batch"``, the name a candidate is run by."""
    return f"{library} {method}@{batch}"


def _images(batch: int, size: tuple[int, int], seed: int, channels: int = 3):
    """The same standard-normal NCHW float32 images in every worker (numpy only)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((batch, channels, *size)).astype(np.float32)


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


def score_for(method: str) -> str:
    """The target score a method is timed with: the softmax probability for the methods that read
    higher derivatives (those of a ReLU network's logit vanish, and XLA would skip the work), else the
    logit."""
    import flaxcam

    higher = {"hvp", "second_derivatives"} & set(flaxcam.METHODS[method].inputs)
    return "softmax" if higher else "logit"


def _devices(requested: int | None) -> list:
    """The first ``requested`` devices (all when None); a clear error when there are fewer."""
    import jax

    devices = jax.devices()
    if requested is None:
        return devices
    if requested > len(devices):
        raise ValueError(f"{requested} devices requested, {len(devices)} {devices[0].platform} device(s) available")
    return devices[:requested]


def _layer_shape(loaded, images, layer: str | None) -> tuple[str | None, tuple[int, ...] | None]:
    """The explained layer's name and output shape (the last spatial layer when ``layer`` is None);
    shape None where the model's layers cannot be listed (counted as unknown, never fatal)."""
    import flaxcam

    list_layers: Callable[..., list] = flaxcam.list_layers  # (nnx_model, images) or (linen_model, variables, images)
    try:
        if loaded.api == "nnx":
            layers = list_layers(loaded.model, images)
        else:
            layers = flaxcam.list_layers(loaded.model, loaded.variables, images)
    except Exception:
        return layer, None
    spatial = [info for info in layers if info.is_spatial]
    chosen = (
        next((info for info in layers if info.name == layer), None) if layer else (spatial[-1] if spatial else None)
    )
    return (chosen.name, tuple(chosen.shape)) if chosen else (layer, None)


def options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``method`` accepts (``METHODS[method].options``)."""
    import flaxcam

    return {key: value for key, value in options.items() if key in flaxcam.METHODS[method].options}


def _explainer(
    loaded, method: str, layer: str | None, chunk_size: int, devices: list, method_options: dict[str, Any] | None = None
) -> Callable:
    """``images -> maps`` through :func:`flaxcam.explain` (FullGrad-like methods take no layer; each
    method gets the ``method_options`` it has)."""
    import flaxcam

    method_layer = None if flaxcam.METHODS[method].bias_layers else layer
    options: dict[str, Any] = {
        "method": method,
        "layer": method_layer,
        "chunk_size": chunk_size,
        "score": score_for(method),
        "method_options": options_for(method, method_options or {}),
    }
    if loaded.api == "nnx":  # explain(nnx_model, images, ...): no variables argument
        return lambda images: flaxcam.explain(loaded.model, images, **options, devices=devices).maps
    return lambda images: flaxcam.explain(loaded.model, loaded.variables, images, **options, devices=devices).maps


def _jitted_step(
    loaded, method: str, layer: str | None, chunk_size: int, method_options: dict[str, Any] | None = None
) -> Callable:
    """``jax.jit(flaxcam.explainer(...))``: the pure explainer step, called as ``step(variables, images)``
    (an NNX model's state for NNX), without :func:`flaxcam.explain`'s host work (bucketing, padding,
    placement, input checks)."""
    import jax

    import flaxcam

    return jax.jit(
        flaxcam.explainer(
            loaded.model,
            method=method,
            layer=None if flaxcam.METHODS[method].bias_layers else layer,
            chunk_size=chunk_size,
            score=score_for(method),
            method_options=options_for(method, method_options or {}),
        )
    )


def _postprocess(size: tuple[int, int]) -> Callable:
    """explain's post-processing of raw maps ``(B, T, h, w)``, jitted alone: ReLU, min-max, resize to
    ``size``, min-max again."""
    import jax

    from flaxcam import ops

    return jax.jit(lambda raw: ops.minmax_normalize(ops.resize_maps(ops.minmax_normalize(jax.nn.relu(raw)), size)))


def flax_candidates(spec: dict[str, Any]) -> tuple[dict[str, Callable], dict[str, str], dict]:
    """Forward-only and every requested method for each batch size, on device-resident inputs; with
    ``spec["split"]`` also the pieces the time split is computed from: ``forward+backward`` (Grad-CAM,
    whose method is a channel mean and a weighted sum) and ``postprocess`` (explain's post-processing
    of maps at the layer's resolution, jitted alone)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import flaxcam
    from flaxcam.bench.models import load

    loaded = load(spec)
    size = loaded.input_size
    devices = _devices(spec.get("devices"))
    # Several (e.g. emulated CPU) devices: the forward pass is sharded over the batch like explain's.
    mesh = Mesh(np.asarray(devices), ("batch",))
    if loaded.api == "nnx":
        from flax import nnx

        graphdef, state = nnx.split(loaded.model)
        variables = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        forward = jax.jit(lambda v, x: nnx.merge(graphdef, v)(x))
    else:
        variables = jax.device_put(loaded.variables, NamedSharding(mesh, PartitionSpec()))
        forward = jax.jit(lambda v, x: loaded.model.apply(v, x))
    input_dtype = jnp.dtype(spec.get("dtype", "float32")) if loaded.dtype_applied == "inputs" else jnp.float32
    chunk_size = spec.get("chunk_size", 32)
    candidates: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    methods: dict[str, dict[str, Any]] = {}
    probe_images = jnp.zeros((1, *size, loaded.channels), input_dtype)
    layer, layer_shape = _layer_shape(loaded, probe_images, loaded.layer)
    channels = int(layer_shape[-1]) if layer_shape else None
    layer_hw = tuple(layer_shape[1:3]) if layer_shape and len(layer_shape) == 4 else size

    def place(batch: int, seed: int):
        sharding = NamedSharding(mesh, PartitionSpec("batch" if batch % len(devices) == 0 else None))
        host = _images(batch, size, seed, loaded.channels).transpose(0, 2, 3, 1)
        return jax.device_put(host.astype(input_dtype), sharding)

    for name in spec["methods"]:
        if name in flaxcam.METHODS:
            method = flaxcam.METHODS[name]
            own = options_for(name, spec.get("method_options") or {})
            methods[name] = {
                "needs_gradients": method.needs_gradients,
                "score": score_for(name),
                "options": own,
                "forward_passes": method.forward_passes(channels, own) if channels else None,
            }
    batches = list(spec["batches"])
    if any(info["forward_passes"] for info in methods.values()) and chunk_size not in batches:
        batches.append(chunk_size)  # the score-based methods' floor: forward passes of chunk-sized batches
    for batch in batches:
        images = place(batch, spec.get("seed", 0))
        candidates[candidate_key("flaxcam", "forward", batch)] = lambda images=images: forward(variables, images)
        if batch not in spec["batches"]:
            continue
        for name in spec["methods"]:
            key = candidate_key("flaxcam", name, batch)
            if name not in flaxcam.METHODS:
                errors[key] = f"unknown method {name!r}: valid names are {', '.join(flaxcam.METHODS)}"
                continue
            run = _explainer(loaded, name, layer, chunk_size, devices, spec.get("method_options"))
            candidates[key] = lambda images=images, run=run: run(images)
            if spec.get("step"):
                step = _jitted_step(loaded, name, layer, chunk_size, spec.get("method_options"))
                candidates[candidate_key("flaxcam", f"{name}-step", batch)] = lambda images=images, step=step: (
                    step(variables, images).maps
                )
        if spec.get("split"):
            probe = _explainer(loaded, "gradcam", layer, chunk_size, devices)
            candidates[candidate_key("flaxcam", "forward+backward", batch)] = lambda images=images, probe=probe: probe(
                images
            )
            raw = jax.device_put(np.random.default_rng(1).standard_normal((batch, 1, *layer_hw)).astype(np.float32))
            post = _postprocess(size)
            candidates[candidate_key("flaxcam", "postprocess", batch)] = lambda raw=raw, post=post: post(raw)
    if spec.get("preprocess"):
        _add_preprocessing(candidates, spec, forward, variables)
    device = devices[0]
    info = {
        "platform": device.platform,
        "device": device.device_kind,
        "devices": len(devices),
        "layer": layer or "default (last spatial)",
        "layer_channels": channels,
        "size": list(size),
        "api": loaded.api,
        "dtype_applied": loaded.dtype_applied,
        "chunk_size": chunk_size,
        "methods": methods,
    }
    return candidates, errors, info


def _add_preprocessing(
    candidates: dict[str, Callable], spec: dict[str, Any], forward: Callable, variables: Any
) -> None:
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
    import torch

    from flaxcam.bench.torch_ref import define_torchvision_schemas

    define_torchvision_schemas()
    torch.set_num_threads(threads)
    return torch


def _torch_model(torch, spec: dict[str, Any]):
    """``(model, target_layer_module)`` on the same weights as the flaxcam worker."""
    from flaxcam.bench.torch_ref import TORCHVISION_RESNETS, efficientnet_lite0_reference, torchvision_resnet

    name = spec.get("model") or "efficientnet_lite0"
    if spec.get("weights"):  # the torchvision checkpoint the flaxcam worker reads too
        model = torchvision_resnet(spec["weights"], name if name in TORCHVISION_RESNETS else None)
        return model, model.layer4
    if name == "efficientnet_lite0":
        model = efficientnet_lite0_reference()
        return model, model.head
    raise ValueError(f"no PyTorch peer for model {name!r}: peers run on torchvision ResNets and efficientnet_lite0")


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
                candidates[candidate_key("pytorch-grad-cam", method, batch)] = lambda cam=cam, images=images: cam(
                    images, None
                )
            if "pytorch-grad-cam" in libraries and method in ("sess", "dff"):
                key = candidate_key("pytorch-grad-cam", method, batch)
                try:  # options the reference cannot take: recorded for this candidate, the others go on
                    candidates[key] = _pytorch_grad_cam_meta(
                        torch, model, target_layer, method, images, spec.get("method_options") or {}
                    )
                except ValueError as error:
                    errors[key] = str(error)
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


def _pytorch_grad_cam_meta(torch, model, target_layer, method: str, images, options: dict[str, Any]) -> Callable:
    """pytorch-grad-cam's counterpart of flaxcam's ``sess`` (``SESS`` around the same base method, each
    image's top class) or ``dff`` (``DeepFeatureFactorization`` of each image on its own, as its
    ``run_dff_on_image`` does: flaxcam's ``dff`` factorizes every image independently), with the
    options both have."""
    import pytorch_grad_cam

    if method == "sess":
        base = getattr(pytorch_grad_cam, PYTORCH_GRAD_CAM[options.get("base", "gradcam")])
        shared = {key: value for key, value in options.items() if key in SESS_OPTIONS}
        if "smooth_sigma" in options and options["smooth_sigma"] not in (0, 5.0):
            raise ValueError("pytorch-grad-cam's SESS blurs with sigma 5 or not at all (smooth_sigma 5.0 or 0)")
        cam = pytorch_grad_cam.SESS(
            model=model,
            target_layers=[target_layer],
            base_method=base,
            smooth=options.get("smooth_sigma", 5.0) > 0,
            **shared,
        )
        return lambda: cam(images, None)
    factorization = pytorch_grad_cam.DeepFeatureFactorization(model, target_layer)
    components = options.get("n_components", 4)  # flaxcam's default

    def run_dff():
        with torch.no_grad():
            return [factorization(images[i : i + 1], n_components=components) for i in range(images.shape[0])]

    return run_dff


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
        except Exception as err:
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
        elif request["op"] == "profile":  # one call under jax.profiler (TensorBoard / Perfetto)
            import jax

            with jax.profiler.trace(request["dir"]):
                block(fn())
            answer({"files": sorted(str(p) for p in Path(request["dir"]).rglob("*") if p.is_file())})
        elif request["op"] == "memory":
            base = (_status_kib("VmRSS") or 0) * 1024
            _reset_peak_rss()
            block(fn())
            answer({"peak_rss_bytes": _peak_rss_bytes(), "base_rss_bytes": base, "device_peak_bytes": device_peak()})
        else:
            answer({"error": f"unknown op {request['op']!r}: valid ops are run, memory, profile, quit"})


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the protocol

    def answer(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    spec = json.loads(sys.argv[1])
    try:
        serve(spec, sys.stdin, answer)
    except Exception as err:
        traceback.print_exc()
        answer({"fatal": f"{type(err).__name__}: {err}"[:1000]})
        sys.exit(1)


if __name__ == "__main__":
    main()

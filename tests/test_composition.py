"""The explainer step under user meshes (emulated CPU devices) and on a third-party NNX model."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxcam
from tests.helpers import subprocess_env

MESH_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import flaxcam
    from flaxcam import pipeline
    from tests.helpers import UserNet, user_net_setup
    assert len(jax.devices()) == 8, jax.devices()
    model = UserNet()
    variables, images = user_net_setup(model, (8, 12, 14, 3))
    methods = ("gradcam", "cam", "layercam")
    single = {
        method: flaxcam.explain(model, variables, images, method=method, top_k=2, devices=jax.devices()[:1])
        for method in methods
    }
    # 4 devices as 2 x 2 and all 8 as 4 x 2 (data x model), in one process
    for count, shape in ((4, (2, 2)), (8, (4, 2))):
        mesh = Mesh(np.asarray(jax.devices()[:count]).reshape(shape), ("data", "model"))

        def fsdp(leaf):  # shard every kernel's output axis over "model" (when it divides), replicate the rest
            if leaf.ndim >= 2 and leaf.shape[-1] % mesh.shape["model"] == 0:
                return NamedSharding(mesh, P(*([None] * (leaf.ndim - 1)), "model"))
            return NamedSharding(mesh, P())

        sharded_variables = jax.device_put(variables, jax.tree_util.tree_map(fsdp, variables))
        sharded_images = jax.device_put(images, NamedSharding(mesh, P("data")))
        for method in methods:
            fn = flaxcam.explainer(model, method=method, layer="top", top_k=2)
            inside = jax.jit(fn)(sharded_variables, sharded_images)
            np.testing.assert_allclose(np.asarray(inside.maps), np.asarray(single[method].maps), atol=1e-5)
            assert inside.maps.sharding.spec[0] == "data", inside.maps.sharding  # follows the images' sharding
            assert len(inside.maps.sharding.device_set) == count
            wrapped = flaxcam.explain(model, sharded_variables, images[:7], method=method, top_k=2, mesh=mesh, batch_axis="data")
            np.testing.assert_allclose(np.asarray(wrapped.maps), np.asarray(single[method].maps[:7]), atol=1e-5)
        placed = pipeline._placed_variables(sharded_variables, mesh)
        kernel = placed["params"]["top"]["conv"]["kernel"]
        assert kernel.sharding.spec == P(None, None, None, "model"), kernel.sharding  # not gathered
        print(f"mesh-ok {count}")
    """
)


def test_two_dimensional_meshes_with_sharded_kernels_equal_one_device(tmp_path):
    """2 x 2 (4 devices) and 4 x 2 (8 devices) data x model meshes with FSDP-style sharded kernels, in one
    process of 8 emulated CPU devices (one process per mesh before: 79 and 64 s)."""
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = subprocess_env()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh-ok 4" in result.stdout and "mesh-ok 8" in result.stdout


def _host(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.array(jax.random.key_data(leaf))
    return np.array(leaf)


def test_third_party_nnx_vit_gradcam_equals_a_hand_split_gradient():
    """jimm's VisionTransformer (jax-image-models, random weights, scanned encoder layers), explained
    with no edits: Grad-CAM at the patch embedding equals Grad-CAM from a jax.grad of the model split
    by hand into patch embedding and the rest."""
    jimm_vit = pytest.importorskip("jimm.models.vit")
    from flax import nnx
    from jimm.common.transformer import scan_forward

    with jax.set_mesh(jax.make_mesh((1,), ("fsdp",))):
        model = jimm_vit.VisionTransformer(
            num_classes=5,
            img_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            mlp_dim=32,
            hidden_size=16,
            rngs=nnx.Rngs(0),
        )
        model.eval()
        images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
        graphdef, state_before = nnx.graphdef(model), jax.tree_util.tree_map(_host, nnx.state(model))
        names = [info.name for info in flaxcam.list_layers(model, images)]
        assert "encoder.patch_embeddings" in names and "classifier" in names
        out = flaxcam.explain(model, images, method="gradcam", layer="encoder.patch_embeddings", targets=[1, 3])

        split_graph, split_state = nnx.split(model)

        def rest(state, patches):  # everything after the patch embedding, written out by hand
            whole = nnx.merge(split_graph, state, copy=True)
            encoder = whole.encoder
            replicated = lambda v: jax.sharding.reshard(v, jax.sharding.PartitionSpec())  # jimm's reshard_like
            batch = patches.shape[0]
            tokens = replicated(patches).reshape(batch, -1, patches.shape[-1])
            cls = replicated(jnp.tile(encoder.cls_token[...], [batch, 1, 1]))
            positions = replicated(jnp.tile(encoder.position_embeddings[...], [batch, 1, 1]))
            x = jnp.concatenate([cls, tokens], axis=1) + positions
            x = encoder.ln_post(scan_forward(x, encoder.layers))
            return whole.classifier(x[:, 0])

        patches = model.encoder.patch_embeddings(images)
        np.testing.assert_allclose(
            np.asarray(rest(split_state, patches)), np.asarray(model(images)), rtol=1e-5, atol=1e-5
        )
        target_score = lambda state, a: rest(state, a)[jnp.arange(2), jnp.asarray([1, 3])].sum()
        gradients = jax.grad(target_score, argnums=1)(split_state, patches)
        a, g = np.asarray(patches, np.float64), np.asarray(gradients, np.float64)
        expected = np.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2)))
        np.testing.assert_allclose(np.asarray(out.raw)[:, 0], expected, rtol=1e-4, atol=1e-5)
    assert nnx.graphdef(model) == graphdef
    for before, after in zip(jax.tree_util.tree_leaves(state_before), jax.tree_util.tree_leaves(nnx.state(model))):
        np.testing.assert_array_equal(before, _host(after))

"""2:4 sparse QuantDense (NNX and Linen), quantize_params(sparsity="2:4") and SparseGPT."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_marlin as jm
from jax_marlin import linen as jl
from jax_marlin.gptq import gptq_quantize, hessian, sparsegpt_quantize
from jax_marlin.nnx import sharding_of


def _two_of_four(codes):
    K, N = codes.shape
    return (np.asarray(codes) != 8).reshape(K // 4, 4, N).sum(axis=1).max() <= 2


def test_nnx_quant_dense_sparse():
    layer = jm.QuantDense(128, 64, sparsity="2:4", group_size=64, rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    assert set(params.keys()) == {"values", "meta", "scales", "bias"}
    assert layer.values[...].shape == (4, 128) and layer.meta[...].shape == (4, 64)
    sqw = jm.SparseQuantizedWeight(values=layer.values[...], meta=layer.meta[...], scales=layer.scales[...])
    assert _two_of_four(jm.unpack_sparse(sqw)[0])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 128)), jnp.float16)
    y = layer(x)
    ref = jm.ops.marlin_matmul_reference(x, sqw) + layer.bias[...]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)
    g = jax.grad(lambda x: layer(x).astype(jnp.float32).sum())(x)
    assert g.shape == x.shape
    with pytest.raises(ValueError, match="sparsity"):
        jm.QuantDense(128, 64, sparsity="1:2", rngs=nnx.Rngs(0))


def test_linen_quant_dense_sparse():
    layer = jl.QuantDense(64, sparsity="2:4", group_size=None)
    x = jnp.ones((2, 128), jnp.float16)
    variables = layer.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"values", "meta", "scales", "bias"}
    y = layer.apply(variables, x)
    p = variables["params"]
    sqw = jm.SparseQuantizedWeight(values=p["values"], meta=p["meta"], scales=p["scales"])
    ref = jm.ops.marlin_matmul_reference(x, sqw) + p["bias"]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


def test_sparse_quant_dense_logical_axes():
    """values, meta and scales carry the kernel's logical names (per-channel scales:
    no name along K), in NNX and Linen, so a rule table shards them like the dense leaves."""
    init = nnx.with_partitioning(nnx.initializers.normal(0.05), ("mlp", "embed"))
    for g, scales_axes in [(64, ("mlp", "embed")), (None, (None, "embed"))]:
        with nnx.use_eager_sharding(False):  # names only
            layer = jm.QuantDense(128, 64, sparsity="2:4", group_size=g, kernel_init=init,
                                  rngs=nnx.Rngs(0))
        names = {leaf: tuple(sharding_of(getattr(layer, leaf).get_metadata())[1])
                 for leaf in ("values", "meta", "scales", "bias")}
        assert names == {"values": ("mlp", "embed"), "meta": ("mlp", "embed"),
                         "scales": scales_axes, "bias": ("embed",)}, names
        linen = jl.QuantDense(64, sparsity="2:4", group_size=g,
                              kernel_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(0.05), ("mlp", "embed")))
        params = linen.init(jax.random.key(0), jnp.ones((1, 128), jnp.float16))["params"]
        boxed = {leaf: params[leaf].names for leaf in ("values", "meta", "scales", "bias")}
        assert boxed == names, boxed


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="down")(nn.relu(nn.Dense(256, name="up")(x)))


def _calib_model():
    rng = np.random.default_rng(0)
    # Correlated inputs with uneven scales: where a Hessian-aware mask matters.
    mix = rng.standard_normal((128, 128)) * np.exp(rng.uniform(-2, 1, 128))[None, :]
    x = (rng.standard_normal((512, 128)) @ mix).astype(np.float32)
    module = _MLP()
    variables = module.init(jax.random.key(1), jnp.asarray(x[:2]))
    return module, variables, jnp.asarray(x)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_params_sparse_linen(method):
    module, variables, x = _calib_model()
    calib = jl.calibration(module, variables, [x[:256]]) if method == "gptq" else None
    q = jm.quantize_params(variables["params"], 128, method, calib, sparsity="2:4", progress=False)
    assert set(q["up"]) == {"values", "meta", "scales", "bias"}

    class QMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jl.QuantDense(256, name="up", sparsity="2:4", dtype=jnp.float16)(x)
            return jl.QuantDense(64, name="down", sparsity="2:4", dtype=jnp.float16)(nn.relu(h))

    y = QMLP().apply({"params": q}, x[256:].astype(jnp.float16))
    ref = module.apply(variables, x[256:])
    err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    # Half the weights of a random MLP are gone: magnitude pruning loses a lot
    # of the output, SparseGPT (calibrated on other rows) much less.
    assert err < {"rtn": 0.8, "gptq": 0.4}[method], err
    for name in ("up", "down"):
        w = jm.SparseQuantizedWeight(values=q[name]["values"], meta=q[name]["meta"], scales=q[name]["scales"])
        assert _two_of_four(jm.unpack_sparse(w)[0])


@pytest.mark.parametrize("g", [128, None])
def test_sparsegpt_beats_magnitude_pruning_on_the_layer_output(g):
    rng = np.random.default_rng(2)
    K, N = 256, 128
    mix = rng.standard_normal((K, K)) * np.exp(rng.uniform(-2, 1, K))[None, :]
    x = (rng.standard_normal((1024, K)) @ mix).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    h = hessian(x)
    sgpt = sparsegpt_quantize(w, h, g)
    mag = jm.quantize_sparse(w, g)
    dense = gptq_quantize(w, h, g)

    def out_err(qw):
        wh = np.asarray(jm.dequantize(qw), np.float32)
        return np.linalg.norm(x @ (w - wh)) / np.linalg.norm(x @ w)

    assert _two_of_four(jm.unpack_sparse(sgpt)[0])
    assert out_err(sgpt) < 0.8 * out_err(mag), (out_err(sgpt), out_err(mag))
    assert out_err(dense) < out_err(sgpt)  # pruning half the weights costs something


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    """With H = I the saliency is w^2 and no error moves: exactly quantize_sparse."""
    w = np.random.default_rng(5).standard_normal((128, 64)).astype(np.float32)
    s = sparsegpt_quantize(w, np.eye(128, dtype=np.float32), 64, damp=0.0)
    m = jm.quantize_sparse(w, 64)
    np.testing.assert_array_equal(np.asarray(jm.unpack_sparse(s)[0]), np.asarray(jm.unpack_sparse(m)[0]))
    np.testing.assert_array_equal(np.asarray(s.scales), np.asarray(m.scales))

"""QuantDense for Flax NNX and Linen: numerics, transforms, metadata, autodiff, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")

import jax_marlin as jm  # noqa: E402
import jax_marlin.linen as jml  # noqa: E402

K, N = 128, 192


def reference(x, layer_params, dtype):
    """x @ dequantize(qw) + b in float32, from the layer's own parameters."""
    qw = jm.QuantizedWeight(packed=layer_params["packed"], scales=layer_params["scales"].astype(dtype))
    w = jm.dequantize(qw).astype(jnp.float32)
    y = jnp.matmul(jnp.asarray(x, dtype).astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    if "bias" in layer_params:
        y = y + layer_params["bias"].astype(dtype).astype(jnp.float32)
    return y


def nnx_params(layer) -> dict:
    return {k: v[...] for k, v in nnx.state(layer, nnx.Param).items()}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_nnx_matches_dequantized_reference(util, dtype, lead):
    layer = jm.QuantDense(K, N, dtype=dtype, param_dtype=dtype, bias_init=nnx.initializers.normal(0.1),
                          rngs=nnx.Rngs(0))
    x = util.random_x(1, (*lead, K), np.float32)  # float32 in: cast to dtype by the layer
    y = layer(x)
    assert y.shape == (*lead, N) and y.dtype == dtype
    assert util.rel_err(y, reference(x, nnx_params(layer), dtype)) <= util.TOLERANCE[np.dtype(dtype)]


@pytest.mark.parametrize("group_size", [64, None])
def test_linen_matches_dequantized_reference(util, group_size):
    layer = jml.QuantDense(N, group_size=group_size, use_bias=False)
    x = util.random_x(2, (4, K), np.float16)
    variables = layer.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"packed", "scales"}
    assert variables["params"]["scales"].shape == ((1 if group_size is None else K // group_size), N)
    y = jax.jit(layer.apply)(variables, x)
    ref = reference(x, variables["params"], jnp.float16)
    assert y.dtype == jnp.float16 and util.rel_err(y, ref) <= util.TOLERANCE[np.dtype(np.float16)]


def test_param_dtype_differs_from_dtype(util):
    # bf16 compute with fp16-stored scales: scales are cast at call time.
    layer = jm.QuantDense(K, N, dtype=jnp.bfloat16, param_dtype=jnp.float16, rngs=nnx.Rngs(0))
    assert layer.scales[...].dtype == jnp.float16
    x = util.random_x(3, (3, K), np.float32)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    assert util.rel_err(y, reference(x, nnx_params(layer), jnp.bfloat16)) <= 1e-2


def test_nnx_jit_eval_shape_and_vmap(util):
    layer = jm.QuantDense(K, N, rngs=nnx.Rngs(0))
    x = util.random_x(4, (6, K), np.float16)
    eager = layer(x)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(layer, x), eager)
    np.testing.assert_array_equal(jax.vmap(layer)(x[:, None]).reshape(6, N), eager)
    abstract = nnx.eval_shape(lambda: jm.QuantDense(K, N, group_size=64, rngs=nnx.Rngs(0)))
    shapes = {k: (v.shape, v.dtype) for k, v in nnx.state(abstract, nnx.Param).items()}
    assert shapes == {
        "packed": ((K // 16, 2 * N), jnp.int32),
        "scales": ((K // 64, N), jnp.float16),
        "bias": ((N,), jnp.float16),
    }
    out = jax.eval_shape(lambda x: layer(x), jax.ShapeDtypeStruct((7, 2, K), jnp.float32))
    assert out.shape == (7, 2, N) and out.dtype == jnp.float16


def test_linen_eval_shape():
    layer = jml.QuantDense(N, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, K), jnp.float32)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert variables["params"]["packed"].shape == (K // 16, 2 * N)
    assert variables["params"]["scales"].dtype == jnp.bfloat16


class _NNXBlock(nnx.Module):
    def __init__(self, dense, rngs):
        self.proj = dense(K, K, rngs=rngs)

    def __call__(self, h):
        return h + self.proj(h).astype(h.dtype)


def _nnx_stack(dense, depth=3):
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return _NNXBlock(dense, rngs)

    return make(nnx.Rngs(0))


def _nnx_scan_forward(blocks, h, remat=False):
    def body(block, h):
        return block(h)

    if remat:
        body = nnx.remat(body)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(block, h):
        return body(block, h)

    return step(blocks, h)


@pytest.mark.parametrize("remat", [False, True])
def test_nnx_scan_over_layers(util, remat):
    blocks = _nnx_stack(jm.QuantDense)
    assert blocks.proj.packed[...].shape == (3, K // 16, 2 * K)
    h = util.random_x(5, (4, K), np.float16)
    y = nnx.jit(functools.partial(_nnx_scan_forward, remat=remat))(blocks, h)
    # The same three layers one after another, outside scan.
    state = nnx.state(blocks.proj, nnx.Param)
    ref = h
    for i in range(3):
        layer = jm.QuantDense(K, K, rngs=nnx.Rngs(1))
        nnx.update(layer, jax.tree.map(lambda a: a[i], state))
        ref = ref + layer(ref)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-3, atol=2e-3)


def test_nnx_remat_gradient_through_scan(util):
    blocks = _nnx_stack(jm.QuantDense)
    h = util.random_x(6, (2, K), np.float16)

    def loss(blocks, h, remat):
        return jnp.sum(_nnx_scan_forward(blocks, h, remat=remat).astype(jnp.float32) ** 2)

    # nnx.grad (not jax.grad): the model passes through nnx.scan inside.
    g_plain = nnx.grad(loss, argnums=1)(blocks, h, False)
    g_remat = nnx.grad(loss, argnums=1)(blocks, h, True)
    assert g_plain.shape == h.shape and np.all(np.isfinite(np.asarray(g_plain, np.float32)))
    np.testing.assert_allclose(np.asarray(g_remat, np.float32), np.asarray(g_plain, np.float32), rtol=1e-2, atol=1e-2)


class _LinenBlock(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, h, _):
        return h + self.dense(K, name="proj")(h).astype(h.dtype), None


class _LinenStack(nn.Module):
    dense: type = nn.Dense
    remat: bool = False

    @nn.compact
    def __call__(self, h):
        block = nn.remat(_LinenBlock) if self.remat else _LinenBlock
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(self.dense, name="blocks")(h, None)[0]


@pytest.mark.parametrize("remat", [False, True])
def test_linen_scan_over_layers(util, remat):
    model = _LinenStack(dense=jml.QuantDense, remat=remat)
    h = util.random_x(7, (4, K), np.float16)
    variables = model.init(jax.random.key(0), h)
    p = variables["params"]["blocks"]["proj"]
    assert p["packed"].shape == (3, K // 16, 2 * K) and p["scales"].shape == (3, 1, K)
    y = jax.jit(model.apply)(variables, h)
    ref = h
    for i in range(3):
        ref = ref + jml.QuantDense(K).apply({"params": jax.tree.map(lambda a: a[i], p)}, ref)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-3, atol=2e-3)


def test_gradients_match_dequantized_reference(util):
    layer = jm.QuantDense(K, N, use_bias=False, rngs=nnx.Rngs(0))
    packed, scales = layer.packed[...], layer.scales[...]
    x = util.random_x(8, (3, K), np.float16)

    def loss_kernel(x, scales):
        return jnp.sum(jm._dense.dense_matmul(x, packed, scales).astype(jnp.float32) ** 2)

    def loss_ref(x, scales):
        w = jm.dequantize(jm.QuantizedWeight(packed=packed, scales=scales)).astype(jnp.float32)
        return jnp.sum(jnp.matmul(x.astype(jnp.float32), w, precision="highest") ** 2)

    gx, gs = jax.grad(loss_kernel, argnums=(0, 1))(x, scales)
    rx, rs = jax.grad(loss_ref, argnums=(0, 1))(x, scales)
    assert gx.dtype == x.dtype and gs.dtype == scales.dtype
    assert util.rel_err(gx, rx) < 5e-3
    assert util.rel_err(gs, rs) < 5e-3
    # Through the layer (bias too) under jit.
    layer_b = jm.QuantDense(K, N, rngs=nnx.Rngs(0))
    g = jax.jit(jax.grad(lambda x: jnp.sum(layer_b(x).astype(jnp.float32))))(x)
    assert g.shape == x.shape


def test_nnx_partitioning_metadata():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    with nnx.use_eager_sharding(False):  # names only: no mesh needed
        grouped = jm.QuantDense(K, N, group_size=64, kernel_init=init, rngs=nnx.Rngs(0))
        channel = jm.QuantDense(K, N, group_size=None, kernel_init=init, use_bias=False, rngs=nnx.Rngs(0))
        own_bias = jm.QuantDense(K, N, kernel_init=init, rngs=nnx.Rngs(0),
                                 bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",)))
    assert grouped.packed.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert grouped.scales.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert grouped.bias.get_metadata()["out_sharding"] == ("mlp",)
    assert channel.scales.get_metadata()["out_sharding"] == (None, "mlp")
    assert own_bias.bias.get_metadata()["out_sharding"] == ("vocab",)
    specs = nnx.get_partition_spec(nnx.state(grouped))
    assert tuple(specs["packed"].get_value()) == ("embed", "mlp")
    # kernel_metadata= works as in nnx.Linear.
    with nnx.use_eager_sharding(False):
        meta_layer = jm.QuantDense(K, N, kernel_metadata={"out_sharding": ("a", "b")}, rngs=nnx.Rngs(0))
    assert meta_layer.packed.get_metadata()["out_sharding"] == ("a", "b")


def test_linen_partitioning_metadata():
    layer = jml.QuantDense(
        N, group_size=64, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))
    boxed = layer.init(jax.random.key(0), jnp.ones((1, K), jnp.float16))["params"]
    assert boxed["packed"].names == ("embed", "mlp")
    assert boxed["scales"].names == ("embed", "mlp")
    assert boxed["bias"].names == ("mlp",)
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["packed"]) == ("embed", "mlp")
    per_channel = jml.QuantDense(N, group_size=None, kernel_init=nn.with_partitioning(
        nn.initializers.lecun_normal(), ("data", "model")))
    boxed = per_channel.init(jax.random.key(0), jnp.ones((1, K), jnp.float16))["params"]
    assert boxed["scales"].names == (None, "model")


def test_bad_construction_and_inputs():
    with pytest.raises(ValueError, match=r"in_features=100.*multiple of 64"):
        jm.QuantDense(100, N, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"features/out_features=96"):
        jm.QuantDense(K, 96, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group_size must be one of"):
        jm.QuantDense(K, N, group_size=16, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="param_dtype must be float16 or bfloat16"):
        jm.QuantDense(K, N, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="dtype must be float16 or bfloat16"):
        jm.QuantDense(K, N, dtype=jnp.float32, rngs=nnx.Rngs(0))
    layer = jm.QuantDense(K, N, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"last dimension must be in_features = 128"):
        layer(jnp.ones((2, 64), jnp.float16))
    with pytest.raises(ValueError, match="multiple of 64"):
        jml.QuantDense(N).init(jax.random.key(0), jnp.ones((2, 100), jnp.float16))
    variables = jml.QuantDense(N).init(jax.random.key(0), jnp.ones((2, K), jnp.float16))
    with pytest.raises(ValueError, match="last dimension must be in_features = 128"):
        jml.QuantDense(N).apply(variables, jnp.ones((2, 256), jnp.float16))

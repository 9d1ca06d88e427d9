"""quantize_params over NNX states and Linen trees: RTN == quantize, GPTQ via
calibration, stacked (scanned) kernels, metadata, warnings, progress, bad input."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")

import jax_marlin as jm  # noqa: E402
import jax_marlin.linen as jml  # noqa: E402
from jax_marlin.params import default_predicate  # noqa: E402


def quant_or_linear(i, o, rngs):
    """The quantized model's layer choice: QuantDense where quantize_params can quantize."""
    if i % 64 == 0 and o % 64 == 0:
        return jm.QuantDense(i, o, rngs=rngs)
    return nnx.Linear(i, o, rngs=rngs)


class MLP(nnx.Module):
    """An NNX model with an embedding, two quantizable layers and an odd-sized head."""

    def __init__(self, dense, rngs):
        self.embed = nnx.Embed(50, 128, rngs=rngs)
        self.up = dense(128, 256, rngs=rngs)
        self.down = dense(256, 128, rngs=rngs)
        self.head = dense(128, 10, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.down(jax.nn.gelu(self.up(h).astype(jnp.float32))).astype(jnp.float32)
        return self.head(h).astype(jnp.float32)


def ids_batch(seed, shape=(8, 16)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 50, shape), jnp.int32)


@pytest.fixture(scope="module")
def float_model():
    return MLP(nnx.Linear, nnx.Rngs(0))


def test_nnx_rtn_is_quantize_and_loads_into_quantdense(float_model):
    params = nnx.state(float_model, nnx.Param)
    with pytest.warns(UserWarning, match=r"left 'head' .* unquantized.*multiples of 64"):
        q = jm.quantize_params(params, progress=False)
    assert isinstance(q, nnx.State)
    assert set(q["up"]) == {"packed", "scales", "bias"} and set(q["head"]) == {"kernel", "bias"}
    assert "embedding" in q["embed"]  # embeddings are left alone
    want = jm.quantize(float_model.up.kernel[...], 128)
    np.testing.assert_array_equal(q["up"]["packed"][...], want.packed)
    np.testing.assert_array_equal(q["up"]["scales"][...], want.scales)
    assert q["up"]["bias"][...].dtype == jnp.float16

    # The README's three lines: quantize, build the QuantDense model abstractly, load.
    qmodel = nnx.eval_shape(lambda: MLP(quant_or_linear, nnx.Rngs(0)))
    nnx.update(qmodel, q)
    ids = ids_batch(1)
    ref = float_model(ids)
    err = float(jnp.linalg.norm(qmodel(ids) - ref) / jnp.linalg.norm(ref))
    assert err < 0.1


def test_nnx_gptq_beats_rtn_with_calibration(float_model):
    params = nnx.state(float_model, nnx.Param)
    calib = jm.nnx.calibration(float_model, [ids_batch(2), ids_batch(3)])
    captured = calib()
    assert captured["up"].shape == (2 * 8 * 16, 128) and captured["down"].shape == (256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head's warning, tested above
        rtn = jm.quantize_params(params, progress=False)
        gptq = jm.quantize_params(params, method="gptq", calib=calib, progress=False)
        seq = jm.quantize_params(params, method="gptq", calib=calib, sequential=True, progress=False)
        # A plain mapping of activations works too (tuple keys or "a/b" strings).
        from_dict = jm.quantize_params(params, method="gptq", calib={("up",): captured["up"],
                                       "down": captured["down"]}, progress=False)
    np.testing.assert_array_equal(from_dict["down"]["packed"][...], gptq["down"]["packed"][...])
    ids = ids_batch(4)  # held out
    ref = float_model(ids)

    def err(q):
        m = nnx.eval_shape(lambda: MLP(quant_or_linear, nnx.Rngs(0)))
        nnx.update(m, q)
        return float(jnp.linalg.norm(m(ids) - ref) / jnp.linalg.norm(ref))

    e_rtn, e_gptq, e_seq = err(rtn), err(gptq), err(seq)
    assert e_gptq < e_rtn and e_seq < e_rtn, (e_rtn, e_gptq, e_seq)


class LinenMLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(x)
        h = jax.nn.relu(self.dense(256, name="up", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x))
        return self.dense(128, name="down")(h).astype(jnp.float32)


def test_linen_variables_boxes_and_gptq(util):
    model = LinenMLP()
    x = util.random_x(5, (64, 128), np.float32)
    variables = model.init(jax.random.key(0), x)
    q = jm.quantize_params(variables, group_size=64, progress=False)
    assert q["batch_stats"] is variables["batch_stats"]  # other collections untouched
    up = q["params"]["up"]
    assert isinstance(up["packed"], nn.LogicallyPartitioned) and up["packed"].names == ("embed", "mlp")
    assert up["scales"].names == ("embed", "mlp") and up["scales"].value.shape == (2, 256)
    qmodel = LinenMLP(dense=lambda f, **kw: jml.QuantDense(f, group_size=64, **kw))
    ref = model.apply(variables, x)
    y = qmodel.apply(q, x)
    assert util.rel_err(y, ref) < 0.2

    calib = jml.calibration(model, variables, [x[:32], x[32:]])
    assert set(calib()) == {"up", "down"}
    qg = jm.quantize_params(variables, group_size=64, method="gptq", calib=calib, progress=False)
    assert util.rel_err(qmodel.apply(qg, x), ref) < util.rel_err(y, ref)


class _Block(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, h, _):
        return h + self.dense(128, name="proj")(h).astype(h.dtype), None


class _Scanned(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, h):
        scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(self.dense, name="blocks")(h, None)[0]


def test_stacked_kernels_of_a_scanned_model(util):
    model = _Scanned()
    x = util.random_x(6, (16, 128), np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    kernel = params["blocks"]["proj"]["kernel"]
    assert kernel.shape == (3, 128, 128)
    # The default predicate takes 2-D kernels only; say that 3-D ones are stacks.
    untouched = jm.quantize_params(params, progress=False)
    assert "kernel" in untouched["blocks"]["proj"]
    q = jm.quantize_params(params, predicate=lambda path, k: k.ndim in (2, 3), progress=False)
    packed = q["blocks"]["proj"]["packed"]
    assert packed.shape == (3, 8, 256)
    np.testing.assert_array_equal(packed[1], jm.quantize(kernel[1], 128).packed)
    y = jax.jit(_Scanned(dense=jml.QuantDense).apply)({"params": q}, x)
    assert util.rel_err(y, model.apply({"params": params}, x)) < 0.2
    # GPTQ on a stack: activations with the same leading (layer) axis.
    acts = {"blocks/proj": jnp.stack([x, 2 * x, x + 1])}
    qg = jm.quantize_params(params, method="gptq", calib=acts, predicate=lambda p, k: True, progress=False)
    assert qg["blocks"]["proj"]["scales"].shape == (3, 1, 128)


def test_nnx_partition_metadata_carries_over():
    class Named(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(128, 128, rngs=rngs, kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), ("embed", "mlp")))

    with nnx.use_eager_sharding(False):
        model = Named(nnx.Rngs(0))
    q = jm.quantize_params(nnx.state(model, nnx.Param), group_size=None, progress=False)
    assert q["proj"]["packed"].get_metadata()["out_sharding"] == ("embed", "mlp")
    assert q["proj"]["scales"].get_metadata()["out_sharding"] == (None, "mlp")


def test_predicates_and_progress(float_model, capsys, monkeypatch):
    params = nnx.state(float_model, nnx.Param)
    # A predicate that skips "down"; the head is excluded by it too (no warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = jm.quantize_params(params, predicate=lambda path, k: path == "up", progress=False)
    assert "packed" in q["up"] and "kernel" in q["down"]
    assert capsys.readouterr().err == ""
    # Without tqdm: a plain progress line on stderr.
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    jm.quantize_params(params, predicate=lambda path, k: path == "up")
    assert "quantize_params (rtn): 1/1 done" in capsys.readouterr().err
    # lm_head and embeddings are skipped by the default predicate.
    assert not default_predicate("model/lm_head", jnp.zeros((64, 64)))
    assert not default_predicate("embed_tokens/proj", jnp.zeros((64, 64)))
    assert default_predicate("layers/0/mlp", jnp.zeros((64, 64)))


def test_bad_input(float_model):
    params = nnx.state(float_model, nnx.Param)
    with pytest.raises(ValueError, match='method must be "rtn" or "gptq"'):
        jm.quantize_params(params, method="awq")
    with pytest.raises(ValueError, match="group_size must be one of"):
        jm.quantize_params(params, group_size=100)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        jm.quantize_params(params, dtype=jnp.float32)
    with pytest.raises(ValueError, match="needs calib="):
        jm.quantize_params(params, method="gptq")
    with pytest.raises(ValueError, match="sequential=True\\) needs a callable calib"):
        jm.quantize_params(params, method="gptq", calib={}, sequential=True)
    with pytest.raises(TypeError, match="nnx.state\\(model, nnx.Param\\)"):
        jm.quantize_params(float_model)
    only_up = lambda path, k: path == "up"  # noqa: E731
    with pytest.raises(KeyError, match="no activations for layer 'up' \\(it has 'down'\\)"):
        jm.quantize_params(params, method="gptq", calib={"down": jnp.ones((4, 256))}, predicate=only_up,
                           progress=False)
    with pytest.raises(ValueError, match=r"activations for 'up' have shape \(4, 64\).*\(\.\.\., 128\)"):
        jm.quantize_params(params, method="gptq", calib={"up": jnp.ones((4, 64))}, predicate=only_up,
                           progress=False)
    with pytest.raises(TypeError, match="calib must be a mapping"):
        jm.quantize_params(params, method="gptq", calib=[1, 2], predicate=only_up, progress=False)

"""jax_marlin.convert: HF GPTQ safetensors -> Marlin (exact), inverse, orbax round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm
from jax_marlin import convert

nnx = pytest.importorskip("flax.nnx")


# --- A tiny HF GPTQ checkpoint, written here independently of convert.py -----------


def hf_pack_along_rows(values):
    """(R, C) values 0..15 -> int32 (R // 8, C): row 8r + j in bits 4j..4j+3 (AutoGPTQ qweight)."""
    v = values.astype(np.uint32)
    out = np.zeros((v.shape[0] // 8, v.shape[1]), np.uint32)
    for j in range(8):
        out |= v[j::8] << np.uint32(4 * j)
    return out.view(np.int32)


def hf_pack_along_cols(values):
    """(R, C) values 0..15 -> int32 (R, C // 8): column 8c + j in bits 4j..4j+3 (AutoGPTQ qzeros)."""
    return hf_pack_along_rows(values.T).T.copy()


def hf_linear(seed, K, N, group_size, stored_zero=7, bias=True):
    """An AutoGPTQ-style sym 4-bit Linear: tensors as saved, plus the codes and scales used."""
    rng = np.random.default_rng(seed)
    g = K if group_size == -1 else group_size
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.02
    scales = (np.abs(w).reshape(K // g, g, N).max(axis=1) / 7).astype(np.float16)
    q = np.clip(np.round(w / np.repeat(scales.astype(np.float32), g, axis=0)) + 8, 0, 15).astype(np.uint8)
    tensors = {
        "qweight": hf_pack_along_rows(q),
        "scales": scales,
        "qzeros": hf_pack_along_cols(np.full((K // g, N), stored_zero, np.uint8)),
        "g_idx": (np.arange(K) // g).astype(np.int32),
    }
    if bias:
        tensors["bias"] = rng.standard_normal(N).astype(np.float16)
    return tensors, q, scales


def hf_dequantize(q, scales, zero=8):
    """What AutoGPTQ computes: (q - zero) * scale, in float16."""
    g = q.shape[0] // scales.shape[0]
    return ((q.astype(np.float32) - zero) * np.repeat(scales.astype(np.float32), g, axis=0)).astype(np.float16)


def write_checkpoint(path, modules, stored_zero=7):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    tensors, truth = {}, {}
    for i, (name, (K, N, g)) in enumerate(modules.items()):
        t, q, s = hf_linear(i, K, N, g, stored_zero)
        truth[name] = (q, s, t.get("bias"))
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    tensors["model.norm.weight"] = np.ones(64, np.float16)
    save_file(tensors, str(path))
    return truth


MODULES = {
    "model.layers.0.mlp.up_proj": (128, 256, 64),
    "model.layers.0.self_attn.q_proj": (256, 128, -1),  # group_size -1: per-channel
    "model.layers.1.mlp.up_proj": (256, 192, 128),
}


@pytest.mark.parametrize("fmt, stored_zero", [("gptq", 7), ("gptq_v2", 8)])
def test_load_gptq_safetensors_is_exact(tmp_path, fmt, stored_zero):
    truth = write_checkpoint(tmp_path / "model.safetensors", MODULES, stored_zero)
    tree = convert.load_gptq_safetensors(tmp_path, checkpoint_format=fmt)  # a directory works
    assert set(tree["model"]["layers"]) == {"0", "1"}
    np.testing.assert_array_equal(tree["model"]["norm"]["weight"], np.ones(64, np.float16))
    for name, (q, scales, bias) in truth.items():
        node = tree
        for k in name.split("."):
            node = node[k]
        assert set(node) == {"packed", "scales", "bias"}
        qw = jm.QuantizedWeight(packed=node["packed"], scales=node["scales"])
        codes, nat_scales = jm.unpack(qw)
        np.testing.assert_array_equal(np.asarray(codes), q)  # bit for bit
        np.testing.assert_array_equal(np.asarray(nat_scales), scales)
        np.testing.assert_array_equal(np.asarray(node["bias"]), bias)
        # The kernel's dense weight is the checkpoint's dequantized weight, exactly.
        np.testing.assert_array_equal(np.asarray(jm.dequantize(qw)), hf_dequantize(q, scales))


def test_wrong_zero_point_format_is_reported(tmp_path):
    write_checkpoint(tmp_path / "v2.safetensors", {"a.proj": (128, 64, 128)}, stored_zero=8)
    with pytest.raises(ValueError, match=r"module 'a.proj'.*not the symmetric zero point 7.*other checkpoint_format"):
        convert.load_gptq_safetensors(tmp_path / "v2.safetensors")


def test_to_gptq_round_trip_and_layout(util):
    qw = util.random_weight(0, 256, 128, 64, np.float16)
    t = convert.to_gptq(qw)
    codes, scales = jm.unpack(qw)
    np.testing.assert_array_equal(t["qweight"], hf_pack_along_rows(np.asarray(codes)))
    np.testing.assert_array_equal(t["qzeros"], hf_pack_along_cols(np.full((4, 128), 7, np.uint8)))
    np.testing.assert_array_equal(t["g_idx"], np.arange(256) // 64)
    back = convert.from_gptq(**t)
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(qw.packed))
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(qw.scales))
    v2 = convert.to_gptq(qw, checkpoint_format="gptq_v2")
    np.testing.assert_array_equal(np.asarray(convert.from_gptq(**v2, checkpoint_format="gptq_v2").packed),
                                  np.asarray(qw.packed))


def test_from_gptq_bad_input():
    t, _, _ = hf_linear(0, 128, 64, 64)
    good = {k: t[k] for k in ("qweight", "scales", "qzeros", "g_idx")}
    with pytest.raises(ValueError, match="desc_act=True"):
        convert.from_gptq(**{**good, "g_idx": np.random.default_rng(0).permutation(128) // 64})
    zeros = np.full((2, 64), 7, np.uint8)
    zeros[1, 3] = 5  # an asymmetric checkpoint
    with pytest.raises(ValueError, match="only sym=True"):
        convert.from_gptq(**{**good, "qzeros": hf_pack_along_cols(zeros)})
    with pytest.raises(ValueError, match=r"qzeros must be \(K // group_size, N // 8\)"):
        convert.from_gptq(**{**good, "qzeros": good["qzeros"][:1]})
    with pytest.raises(ValueError, match="qweight must be int32"):
        convert.from_gptq(**{**good, "qweight": good["qweight"].astype(np.int64)})
    with pytest.raises(ValueError, match="Only 4-bit"):
        convert.from_gptq(**{**good, "scales": good["scales"][:, :32]})
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        convert.from_gptq(**{**good, "scales": good["scales"].astype(np.float32)})
    with pytest.raises(ValueError, match='checkpoint_format must be "gptq" or "gptq_v2"'):
        convert.from_gptq(**good, checkpoint_format="awq")
    t32, _, _ = hf_linear(1, 96, 64, 32)  # K = 96: not a multiple of the kernel's tile
    with pytest.raises(ValueError, match="multiple of 64"):
        convert.from_gptq(t32["qweight"], t32["scales"])


# --- orbax ------------------------------------------------------------------------


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.proj = jm.QuantDense(128, 128, group_size=64, rngs=rngs)
        self.norm = nnx.LayerNorm(128, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.proj(x).astype(jnp.float32))


def test_orbax_round_trip_nnx(tmp_path, util):
    model = Tiny(nnx.Rngs(0))
    x = util.random_x(1, (4, 128), np.float32)
    convert.save(tmp_path / "ckpt", nnx.state(model, nnx.Param))
    fresh = nnx.eval_shape(lambda: Tiny(nnx.Rngs(1)))  # abstract: no weights computed
    restored = convert.restore(tmp_path / "ckpt", nnx.state(fresh, nnx.Param))
    nnx.update(fresh, restored)
    assert fresh.proj.packed[...].dtype == jnp.int32
    np.testing.assert_array_equal(fresh.proj.packed[...], model.proj.packed[...])
    np.testing.assert_array_equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="already exists"):  # no silent overwrite
        convert.save(tmp_path / "ckpt", nnx.state(model, nnx.Param))
    convert.save(tmp_path / "ckpt", nnx.state(model, nnx.Param), force=True)


def test_orbax_round_trip_linen_and_quantized_weight(tmp_path, util):
    qw = util.random_weight(2, 128, 64, 128, jnp.bfloat16)
    tree = {"layer": {"packed": qw.packed, "scales": qw.scales, "bias": jnp.ones(64, jnp.bfloat16)},
            "weight": qw}
    convert.save(tmp_path / "linen", tree)
    plain = convert.restore(tmp_path / "linen")  # no target: nested dicts of arrays
    np.testing.assert_array_equal(plain["layer"]["packed"], qw.packed)
    typed = convert.restore(tmp_path / "linen", jax.eval_shape(lambda: tree))
    assert isinstance(typed["weight"], jm.QuantizedWeight)
    assert typed["weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(typed["weight"].scales, qw.scales)

"""A Llama-style decoder in Flax NNX with 4-bit (QuantDense) or 16-bit linear layers.

    cfg = CONFIGS["tiny"]
    model = Llama(cfg, dense=dense_factory("int4", jnp.bfloat16), rngs=nnx.Rngs(0))
    cache = init_cache(cfg, batch=2, max_len=64, dtype=jnp.bfloat16)
    logits, cache = model(tokens, cache, index=0, pad=pad)

Architecture (as Hugging Face's LlamaForCausalLM, so its checkpoints load as
they are, see ``hf.py``): token embedding; per layer RMSNorm -> grouped-query
attention with rotary embeddings (the "rotate half" convention) -> residual,
RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; lm_head (or the embedding
transposed when tied).

The projections of each layer come from ``dense(in, out, axes, rngs)``, so
one model code serves the int4 model (``jax_marlin.QuantDense``) and the
16-bit baseline (``nnx.Linear``). By default (``cfg.fused_projections``) a
layer has four: ``qkv_proj`` (q, k and v in one matmul), ``o_proj``,
``gate_up_proj`` (gate and up in one) and ``down_proj``; their column orders
are ``fusion.py``'s. With ``fused_projections=False`` it has Hugging Face's
seven (q, k, v, o, gate, up, down). Their names and logical axes are
``jax_marlin.sharding.LLAMA_PROJECTIONS``: with ``MODEL_RULES`` qkv (q/k/v)
and gate_up (gate/up) are column parallel and o/down row parallel over the
mesh axis "model". ``fused_model`` turns an unfused model into its fused twin.

The KV cache is a list of per-layer ``(k, v)`` arrays ``(batch, max_len,
kv_heads, head_dim)`` preallocated at their full length (static shapes: one
compiled program whatever the step). Prompts are left-padded: row b's first
``pad[b]`` slots hold padding, which no query attends to, and its tokens'
positions count from its first real token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_marlin as jm
from jax_marlin.models import fusion
from jax_marlin.nnx import sharding_of
from jax_marlin.sharding import LLAMA_PROJECTIONS, LOGICAL_AXIS_RULES, MODEL_AXIS

__all__ = ["CONFIGS", "Llama", "LlamaConfig", "MODEL_RULES", "check_tensor_parallel",
           "dense_factory", "fused_model", "init_cache", "cache_shardings",
           "max_tensor_parallel", "param_shardings", "random_state"]

# The library's rules plus the vocabulary: the embedding table and lm_head are
# split over "model" along the vocabulary (XLA adds the collectives).
MODEL_RULES = LOGICAL_AXIS_RULES + (("vocab", MODEL_AXIS), ("norm", None))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # model width (hidden_size)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    ffn_dim: int  # SwiGLU hidden width (intermediate_size)
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02  # random init of the projections
    embed_std: float = 0.02  # random init of the embedding (and lm_head)
    # One qkv_proj and one gate_up_proj per layer (4 matmuls, not 7); see fusion.py.
    fused_projections: bool = True

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads}).")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even (rotary pairs), got {self.head_dim}.")
        if self.fused_projections:
            fusion.gate_up_chunk(self.ffn_dim)  # raises unless ffn_dim can be interleaved

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def n_params(self) -> int:
        """Number of parameters (embedding and lm_head included)."""
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return (self.n_layers * (attn + mlp + 2 * self.dim) + self.vocab_size * self.dim
                + head + self.dim)


CONFIGS = {
    # CPU default: 4 query heads sharing 2 KV heads, every projection a
    # multiple of 64 (the kernel's tile) in both dimensions and of 128 (the
    # group) along K, and splittable over 2 devices ("model") as the 8-device
    # test needs. The embedding is initialized large so that the random model
    # has peaked next-token distributions (greedy decisions are not near-ties).
    "tiny": LlamaConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=768, embed_std=1.0),
    # Llama-2 shapes (random weights unless loaded from a checkpoint).
    "llama2-7b": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                             n_kv_heads=32, ffn_dim=11008),
    "llama2-13b": LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40,
                              n_kv_heads=40, ffn_dim=13824),
    "llama2-70b": LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8, ffn_dim=28672),
}


# --- Linear layers: int4 or 16-bit, same call --------------------------------------

DenseFactory = Callable[..., nnx.Module]


def dense_factory(kind: str, dtype=jnp.bfloat16, *, group_size: int | None = 128,
                  scales_dtype=None, init_std: float | None = None) -> DenseFactory:
    """``make(in_features, out_features, axes, rngs, std)`` building the model's projections.

    kind: "int4" (``jax_marlin.QuantDense``: 4-bit weight, computing in
    ``dtype``, scales stored in ``scales_dtype``, default ``dtype``) or
    "dense" (``nnx.Linear`` with a ``dtype`` weight: the 16-bit baseline).
    ``axes`` are the weight's logical axis names (``LLAMA_PROJECTIONS``).
    """
    dtype = jnp.dtype(dtype)
    scales_dtype = jnp.dtype(scales_dtype or dtype)
    if kind not in ("int4", "dense"):
        raise ValueError(f'dense_factory: kind must be "int4" or "dense", got {kind!r}.')

    def make(in_features, out_features, axes, rngs, std):
        init = nnx.with_partitioning(nnx.initializers.normal(init_std or std), axes)
        if kind == "int4":
            return jm.QuantDense(in_features, out_features, use_bias=False, dtype=dtype,
                                 param_dtype=scales_dtype, group_size=group_size,
                                 kernel_init=init, rngs=rngs)
        return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype,
                          param_dtype=dtype, kernel_init=init, rngs=rngs)

    make.kind, make.dtype, make.group_size = kind, dtype, group_size
    return make


# --- Layers ------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (as Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, "rotate half" pairs (i, i + d/2), of x (B, T, heads, d) at positions (B, T)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, d/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(index, T: int, S: int, pad):
    """(B, T, S) bool: query t (cache slot index + t) may see slot s of its row.

    Slot s is visible when it holds a real token of the row (s >= pad[b]) and
    is not in the future (s <= index + t).
    """
    q_slot = index + jnp.arange(T)
    s = jnp.arange(S)
    causal = s[None, :] <= q_slot[:, None]  # (T, S)
    real = s[None, :] >= pad[:, None]  # (B, S)
    return causal[None] & real[:, None, :]


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dense: DenseFactory, rngs: nnx.Rngs):
        D, hd = cfg.dim, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.theta = cfg.rope_theta
        self.fused = cfg.fused_projections
        std = cfg.init_std
        P_ = LLAMA_PROJECTIONS
        if self.fused:
            self.qkv_proj = dense(D, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, P_["qkv_proj"],
                                  rngs, std)
        else:
            self.q_proj = dense(D, cfg.n_heads * hd, P_["q_proj"], rngs, std)
            self.k_proj = dense(D, cfg.n_kv_heads * hd, P_["k_proj"], rngs, std)
            self.v_proj = dense(D, cfg.n_kv_heads * hd, P_["v_proj"], rngs, std)
        self.o_proj = dense(cfg.n_heads * hd, D, P_["o_proj"], rngs, std)

    def __call__(self, x, kv, index, pad, positions):
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused:
            q, k, v = fusion.split_qkv(self.qkv_proj(x), H, KV, hd)
        else:
            q = self.q_proj(x).reshape(B, T, H, hd)
            k = self.k_proj(x).reshape(B, T, KV, hd)
            v = self.v_proj(x).reshape(B, T, KV, hd)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        k_cache, v_cache = kv
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        S = k_cache.shape[1]
        mask = attention_mask(index, T, S, pad)

        # Grouped-query attention: the G = H / KV query heads of a group share
        # one cached K/V head; softmax in float32.
        qg = q.reshape(B, T, KV, H // KV, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(q.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache,
                         preferred_element_type=jnp.float32)
        out = out.reshape(B, T, H * hd).astype(x.dtype)
        return self.o_proj(out), (k_cache, v_cache)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dense: DenseFactory, rngs: nnx.Rngs):
        D, F, std = cfg.dim, cfg.ffn_dim, cfg.init_std
        self.ffn_dim, self.fused = F, cfg.fused_projections
        if self.fused:
            self.gate_up_proj = dense(D, 2 * F, LLAMA_PROJECTIONS["gate_up_proj"], rngs, std)
        else:
            self.gate_proj = dense(D, F, LLAMA_PROJECTIONS["gate_proj"], rngs, std)
            self.up_proj = dense(D, F, LLAMA_PROJECTIONS["up_proj"], rngs, std)
        self.down_proj = dense(F, D, LLAMA_PROJECTIONS["down_proj"], rngs, std)

    def __call__(self, x):
        if self.fused:
            gate, up = fusion.split_gate_up(self.gate_up_proj(x), self.ffn_dim)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        h = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
        # Fused: (..., F/C, C) chunks in gate/up order, which is F's order.
        return self.down_proj(h.reshape(*x.shape[:-1], self.ffn_dim).astype(x.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dense: DenseFactory, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.attn = Attention(cfg, dense, rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, dense, rngs)

    def __call__(self, x, kv, index, pad, positions):
        a, kv = self.attn(self.attn_norm(x), kv, index, pad, positions)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


class Llama(nnx.Module):
    """The decoder. ``dense``: a ``dense_factory`` (int4 or 16-bit projections).

    ``dtype``: activations, norms, embedding and lm_head (default: the
    factory's dtype). The projections' own dtypes come from the factory.
    """

    def __init__(self, cfg: LlamaConfig, *, dense: DenseFactory, dtype=None, rngs: nnx.Rngs):
        # Logical axis names only: the parameters are placed on devices later
        # (param_shardings), not at creation, so no mesh is needed here.
        with nnx.use_eager_sharding(False):
            self._build(cfg, dense, dtype, rngs)

    def _build(self, cfg, dense, dtype, rngs):
        dtype = jnp.dtype(dtype or getattr(dense, "dtype", jnp.bfloat16))
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.dim, dtype=dtype, param_dtype=dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.embed_std),
                                                 ("vocab", "embed")),
            rngs=rngs)
        self.layers = nnx.List([Block(cfg, dense, dtype, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        if cfg.tie_embeddings:
            self.lm_head = nnx.data(None)
        else:
            # 16-bit like the embedding: quantize_params' default leaves lm_head alone.
            self.lm_head = nnx.Linear(
                cfg.dim, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                kernel_init=nnx.with_partitioning(nnx.initializers.normal(cfg.embed_std / math.sqrt(cfg.dim)),
                                                  ("embed", "vocab")),
                rngs=rngs)

    def __call__(self, tokens, cache, index, pad, *, all_logits: bool = True):
        """Run ``tokens`` (B, T) written at cache slots ``index .. index + T - 1``.

        Args:
          tokens: int32 (B, T).
          cache: ``init_cache(...)``: [(k, v)] per layer, (B, S, kv_heads, head_dim).
          index: int scalar (may be traced): the cache slot of tokens[:, 0].
          pad: int32 (B,): leading padding slots of each row (left padding).
          all_logits: False: logits of the last position only, (B, 1, V).

        Returns:
          (logits float32 (B, T or 1, V), the updated cache).
        """
        B, T = tokens.shape
        # Row b's token at slot s is its (s - pad[b])-th real token.
        positions = jnp.maximum(index + jnp.arange(T)[None, :] - pad[:, None], 0)
        x = self.embed(tokens)
        new_cache = []
        for layer, kv in zip(self.layers, cache):
            x, kv = layer(x, kv, index, pad, positions)
            new_cache.append(kv)
        if not all_logits:
            x = x[:, -1:]
        x = self.norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32), new_cache


# --- KV cache ---------------------------------------------------------------------


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16, shardings=None):
    """[(k, v)] zeros, each (batch, max_len, n_kv_heads, head_dim); on ``shardings`` if given."""
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)

    def make():
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]

    if shardings is None:
        return make()
    return jax.jit(make, out_shardings=shardings)()


# --- Sharding ---------------------------------------------------------------------


def _logical_axes(var) -> tuple | None:
    if not hasattr(var, "get_metadata"):
        return None
    _, names = sharding_of(var.get_metadata())
    return tuple(names) if names else None


def _spec(names, shape, mesh, rules) -> P:
    table = dict(rules)
    entries = []
    for name, size in zip(names, shape):
        axis = table.get(name)
        # A dimension a mesh axis does not divide stays whole (replicated).
        if axis is not None and (axis not in mesh.shape or size % mesh.shape[axis]):
            axis = None
        entries.append(axis)
    return P(*entries)


def param_shardings(state, mesh, rules=MODEL_RULES):
    """NamedShardings for an NNX state (``nnx.state(model)``) from its logical axis names.

    The result has the state's structure: ``jax.device_put(state, param_shardings(state, mesh))``.
    Leaves without names are replicated.
    """
    def one(var):
        names = _logical_axes(var)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", ())
        spec = P() if names is None else _spec(names, shape, mesh, rules)
        sharding = NamedSharding(mesh, spec)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_shardings(cfg: LlamaConfig, mesh, rules=MODEL_RULES):
    """Per-layer (k, v) shardings: batch over "data", KV heads over "model" (as k_proj's output,
    or the fused qkv_proj's, whose shards hold whole KV-head groups in the same order)."""
    table = dict(rules)
    batch_axis = table.get("batch") if table.get("batch") in mesh.shape else None
    head_axis = table.get("kv_heads") if table.get("kv_heads") in mesh.shape else None
    if head_axis is not None and cfg.n_kv_heads % mesh.shape[head_axis]:
        head_axis = None
    s = NamedSharding(mesh, P(batch_axis, None, head_axis, None))
    return [(s, s) for _ in range(cfg.n_layers)]


def check_tensor_parallel(cfg: LlamaConfig, tp: int, group_size: int | None = 128) -> None:
    """Raise ValueError (saying what to change) unless ``cfg`` splits over ``tp`` devices.

    Every device must get whole KV heads with their query heads (for the fused
    qkv_proj: whole column groups, see ``fusion``), whole gate/up chunk pairs
    (fused gate_up_proj), and int4 weight shards must be multiples of 64
    columns (column parallel) or of 64 rows in whole groups (row parallel).
    """
    if tp <= 1:
        return
    problems = []
    H, KV, hd, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    if KV % tp:  # H = G * KV: then H % tp too
        problems.append(f"n_heads={H} and n_kv_heads={KV} must both be multiples of tp={tp} "
                        f"(whole KV heads, with their query heads, per device)")
    # Output widths of column-parallel weights, input widths of row-parallel ones.
    if cfg.fused_projections:
        columns = {"(n_heads + 2 * n_kv_heads) * head_dim": (H + 2 * KV) * hd, "2 * ffn_dim": 2 * F}
    else:
        columns = {"n_heads * head_dim": H * hd, "n_kv_heads * head_dim": KV * hd, "ffn_dim": F}
    rows = {"n_heads * head_dim": H * hd, "ffn_dim": F}
    for name, width in columns.items():
        if width % (64 * tp):
            problems.append(f"{name} = {width} must be a multiple of 64 * tp = {64 * tp}")
    for name, width in rows.items():
        if width % (64 * tp):
            if name not in columns:  # else already said
                problems.append(f"{name} = {width} must be a multiple of 64 * tp = {64 * tp}")
        elif group_size and width % (group_size * tp):
            problems.append(f"{name} = {width} must be a multiple of group_size * tp = "
                            f"{group_size * tp} (row-parallel shards hold whole groups)")
    if cfg.fused_projections:
        C = fusion.gate_up_chunk(F)
        if F % (C * tp):
            problems.append(f"ffn_dim = {F} must be a multiple of {C} * tp = {C * tp} (the fused "
                            f"gate_up_proj interleaves gate and up in chunks of {C} columns; "
                            f"each device needs whole chunk pairs), or use "
                            f"fused_projections=False")
    if problems:
        raise ValueError(f"tensor parallelism over {tp} devices does not fit this model: "
                         + "; ".join(problems) + ". Use a --tp that divides them.")


def max_tensor_parallel(cfg: LlamaConfig, limit: int, group_size: int | None = 128) -> int:
    """The largest tp <= ``limit`` that ``check_tensor_parallel`` accepts."""
    for tp in range(limit, 1, -1):
        try:
            check_tensor_parallel(cfg, tp, group_size)
            return tp
        except ValueError:
            pass
    return 1


# --- Fusing an unfused model ---------------------------------------------------------


def _projection_params(module) -> dict:
    """A projection's weight as a fusion.fuse part: QuantizedWeight (int4) or kernel (16-bit)."""
    if isinstance(module, jm.QuantDense):
        return jm.QuantizedWeight(packed=module.packed.get_value(), scales=module.scales.get_value())
    return module.kernel.get_value()


def _set_projection(module, weight) -> None:
    if isinstance(weight, jm.QuantizedWeight):
        module.packed.set_value(weight.packed)
        module.scales.set_value(weight.scales)
    else:
        module.kernel.set_value(weight)


def fused_model(model: Llama) -> Llama:
    """The fused twin of an unfused ``model`` (int4 or 16-bit): the same function, 4 matmuls a layer.

    q/k/v and gate/up are fused in ``fusion``'s column orders; int4 weights
    are fused in the packed format (no requantization). Everything else is
    shared as is.
    """
    cfg = model.cfg
    if cfg.fused_projections:
        return model
    fcfg = cfg.replace(fused_projections=True)
    proj = model.layers[0].mlp.down_proj
    if isinstance(proj, jm.QuantDense):
        factory = dense_factory("int4", proj.dtype, group_size=proj.group_size,
                                scales_dtype=proj.param_dtype)
    else:
        factory = dense_factory("dense", proj.kernel.get_value().dtype)
    out = nnx.eval_shape(lambda: Llama(fcfg, dense=factory, dtype=model.dtype, rngs=nnx.Rngs(0)))

    def shared(dst, src):  # every parameter both models have (all but q/k/v/gate/up)
        return {k: shared(v, src[k]) if isinstance(v, dict) else src[k]
                for k, v in dst.items() if k in src}

    state = nnx.state(out, nnx.Param)
    nnx.replace_by_pure_dict(state, shared(nnx.to_pure_dict(state),
                                           nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    nnx.update(out, state)
    qkv = fusion.qkv_columns(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    gate_up = fusion.gate_up_columns(cfg.ffn_dim)
    for src, dst in zip(model.layers, out.layers):
        _set_projection(dst.attn.qkv_proj, fusion.fuse(
            {p: _projection_params(getattr(src.attn, f"{p}_proj")) for p in fusion.QKV_PARTS}, qkv))
        _set_projection(dst.mlp.gate_up_proj, fusion.fuse(
            {p: _projection_params(getattr(src.mlp, f"{p}_proj")) for p in fusion.GATE_UP_PARTS},
            gate_up))
    return out


# --- Random weights at any size ------------------------------------------------------


def _leaf_kind(path: str) -> str:
    if "scales" in path:
        return "scales"
    if "scale" in path:  # RMSNorm
        return "ones"
    if "embed" in path:
        return "embed"
    if "lm_head" in path:
        return "lm_head"
    return "kernel"


def random_state(abstract_model: nnx.Module, seed: int = 0, shardings=None, on_device=None):
    """A state for ``abstract_model`` (``nnx.eval_shape(lambda: Llama(...))``) with random weights.

    Made without building float kernels and quantizing them: int4 weights
    get random packed codes (any bit pattern is a valid weight) and scales
    of a N(0, init_std) weight's size, 16-bit kernels N(0, std), norms ones.
    Small models are drawn with numpy on the host (no compilation); large
    ones (``on_device``, default: over 5e8 parameters) in one jitted program
    on the devices, sharded as ``shardings`` (e.g. ``param_shardings``), so
    that a 70B model never passes through host memory.
    """
    cfg = abstract_model.cfg
    _, state = nnx.split(abstract_model)
    flat, treedef = jax.tree.flatten_with_path(state)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    stds = {"kernel": cfg.init_std, "embed": cfg.embed_std,
            "lm_head": cfg.embed_std / math.sqrt(cfg.dim)}
    if on_device is None:
        on_device = sum(math.prod(x.shape) for x in leaves) > 5e8

    if not on_device:
        rng = np.random.default_rng(seed)
        values = []
        for path, leaf in zip(paths, leaves):
            kind = _leaf_kind(path)
            if leaf.dtype == jnp.int32:
                v = rng.integers(0, 2**32, leaf.shape, dtype=np.uint32).view(np.int32)
            elif kind == "scales":  # codes -8..7 times s: std ~ 4.6 s
                v = np.full(leaf.shape, cfg.init_std / 4.6, np.float32)
            elif kind == "ones":
                v = np.ones(leaf.shape, np.float32)
            else:
                v = rng.standard_normal(leaf.shape, np.float32) * stds[kind]
            values.append(jnp.asarray(v.astype(leaf.dtype) if leaf.dtype != jnp.int32 else v))
        if shardings is not None:
            values = jax.device_put(values, jax.tree.leaves(shardings))
        return jax.tree.unflatten(treedef, values)

    # One small jitted program per distinct (shape, dtype, kind, sharding), run
    # once per leaf: a 70B model has ~700 leaves but a handful of kinds, and
    # one program making all of them at once takes minutes to compile.
    out_shardings = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)

    @functools.cache
    def maker(shape, dtype, kind, sharding):
        def make(key):
            if dtype == jnp.int32:
                return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint32), jnp.int32)
            if kind == "scales":
                return jnp.full(shape, cfg.init_std / 4.6, dtype)
            if kind == "ones":
                return jnp.ones(shape, dtype)
            return (jax.random.normal(key, shape) * stds[kind]).astype(dtype)
        return jax.jit(make, out_shardings=sharding)

    # "rbg" keys: XLA's own generator, far quicker to compile and run than threefry.
    key = jax.random.key(seed, impl="rbg")
    values = [maker(leaf.shape, jnp.dtype(leaf.dtype), _leaf_kind(path), sharding)(jax.random.fold_in(key, i))
              for i, (path, leaf, sharding) in enumerate(zip(paths, leaves, out_shardings))]
    return jax.tree.unflatten(treedef, values)


def count_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))



def random_model(cfg: LlamaConfig, kind: str = "dense", dtype=jnp.bfloat16, *, seed: int = 0,
                 group_size: int | None = 128) -> Llama:
    """A ``Llama`` with random weights (``random_state``), built without eager per-layer init."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, dense=dense_factory(kind, dtype, group_size=group_size),
                                            rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, random_state(abstract, seed))


def quantize_model(model: Llama, group_size: int | None = 128, **quantize_params_kwargs) -> Llama:
    """The int4 twin of a 16-bit ``model``: its projections through ``jax_marlin.quantize_params``
    (RTN by default; pass method="gptq", calib=... for GPTQ), the rest shared as is."""
    cfg, dtype = model.cfg, model.dtype
    kwargs = dict(progress=False, dtype=dtype, **quantize_params_kwargs)
    q = jm.quantize_params(nnx.state(model, nnx.Param), group_size, **kwargs)
    qmodel = nnx.eval_shape(lambda: Llama(cfg, dense=dense_factory("int4", dtype, group_size=group_size),
                                          dtype=dtype, rngs=nnx.Rngs(0)))
    nnx.update(qmodel, q)
    return qmodel


def dequantized_model(qmodel: Llama) -> Llama:
    """A 16-bit ``Llama`` whose kernels are the int4 model's dequantized weights.

    It computes what the int4 model computes, up to the order of float sums:
    the check that isolates the kernel from the quantization error.
    """
    cfg, dtype = qmodel.cfg, qmodel.dtype
    dense = nnx.eval_shape(lambda: Llama(cfg, dense=dense_factory("dense", dtype), dtype=dtype,
                                         rngs=nnx.Rngs(0)))
    q_state = nnx.state(qmodel, nnx.Param)

    def convert(node):
        if isinstance(node, dict) and "packed" in node:
            qw = jm.QuantizedWeight(packed=node["packed"], scales=node["scales"])
            return {"kernel": jm.dequantize(qw).astype(dtype)}
        if isinstance(node, dict):
            return {k: convert(v) for k, v in node.items()}
        return node

    state = nnx.state(dense, nnx.Param)
    nnx.replace_by_pure_dict(state, convert(nnx.to_pure_dict(q_state)))
    nnx.update(dense, state)
    return dense

"""Load a Hugging Face Llama-format checkpoint (a directory of safetensors) into ``llama.Llama``.

    model = load_llama("path/to/Llama-2-7b-hf")                       # 4-bit RTN on load
    model = load_llama("path/to/Llama-2-7b-hf", quantize=None)        # 16-bit
    model = load_llama("path/to/Llama-2-7b-hf", quantize="gptq", calib=[token_batch, ...])
    model = load_llama("path/to/Llama-2-7B-GPTQ")                     # a GPTQ checkpoint: repacked, exact

The directory holds ``config.json`` (LlamaForCausalLM's: hidden_size,
num_attention_heads, num_key_value_heads, ...) and ``*.safetensors`` with
Hugging Face's tensor names (``model.layers.0.self_attn.q_proj.weight``,
torch's (out, in) layout: transposed here). The rotary convention of those
checkpoints ("rotate half") is the model's own, so nothing is permuted.
By default the model has fused projections (``LlamaConfig.fused_projections``):
q/k/v and gate/up are fused as read, in ``fusion``'s column orders, before
quantizing (exact for RTN, whose scales are per column; for GPTQ right, since
the three share one input and so one Hessian). ``fused=False`` gives the
unfused model.

- ``quantize="rtn"`` (default): each projection is quantized as it is read,
  through ``jax_marlin.quantize_params``, so only one float layer is in
  memory at a time.
- ``quantize="gptq"``: the 16-bit model is loaded whole, then
  ``quantize_params(method="gptq")`` with the inputs each layer sees on
  ``calib`` (token arrays), captured by ``jax_marlin.nnx.calibration``.
- A checkpoint whose config has ``quantization_config.quant_method == "gptq"``
  (AutoGPTQ / Optimum: 4 bits, sym, desc_act=False) is repacked exactly with
  ``jax_marlin.convert.from_gptq``, then fused in the packed format (column
  slices, no requantization); its scales keep their float16.
- ``quantize=None``: the 16-bit model (the baseline).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_marlin as jm
from jax_marlin.models import fusion
from jax_marlin.models.llama import Llama, LlamaConfig, dense_factory, init_cache

__all__ = ["config_from_hf", "load_llama"]


def config_from_hf(hf: dict) -> LlamaConfig:
    """A ``LlamaConfig`` from a Hugging Face ``config.json`` dict (LlamaForCausalLM)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ValueError(f"config.json: model_type {model_type!r} is not a Llama-architecture "
                         f"model; load_llama reads LlamaForCausalLM checkpoints.")
    if hf.get("rope_scaling"):
        raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']} is not supported "
                         f"(plain rotary embeddings only, as Llama 2).")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json: attention_bias/mlp_bias are not supported (Llama has no biases).")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) is supported.")
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"], head_dim=hf.get("head_dim") or 0,
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


class _Tensors:
    """Tensors by name across the directory's safetensors files, read on demand."""

    def __init__(self, directory: pathlib.Path):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError("load_llama needs the safetensors package: pip install safetensors "
                              "(or pip install 'jax_marlin[examples]').") from None
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"load_llama: no *.safetensors files in {directory}.")
        self._where = {}
        for f in files:
            h = safe_open(os.fspath(f), framework="np")
            for name in h.keys():
                self._where[name] = h
        self.used: set[str] = set()

    def __contains__(self, name):
        return name in self._where

    def __getitem__(self, name) -> np.ndarray:
        if name not in self._where:
            near = sorted(n for n in self._where if n.rsplit(".", 2)[0] in name)[:5]
            raise KeyError(f"load_llama: tensor {name!r} is not in the checkpoint"
                           + (f" (similar: {near})" if near else "") + ".")
        self.used.add(name)
        return self._where[name].get_tensor(name)

    def unused(self) -> list[str]:
        return sorted(set(self._where) - self.used)


def _set(var, array, dtype):
    var.set_value(jnp.asarray(np.asarray(array), dtype))


def _projections(layer, i, cfg: LlamaConfig):
    """[(projection module, {part: HF module name}, column segments)] of layer i.

    Part "q" is HF's "q_proj" etc. A fused projection's segments are
    ``fusion``'s column order; an unfused one's are None (one part).
    """
    attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    if cfg.fused_projections:
        yield (layer.attn.qkv_proj, {p: f"{attn}{p}_proj" for p in fusion.QKV_PARTS},
               fusion.qkv_columns(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim))
    else:
        for p in fusion.QKV_PARTS:
            yield getattr(layer.attn, f"{p}_proj"), {p: f"{attn}{p}_proj"}, None
    yield layer.attn.o_proj, {"o": f"{attn}o_proj"}, None
    if cfg.fused_projections:
        yield (layer.mlp.gate_up_proj, {p: f"{mlp}{p}_proj" for p in fusion.GATE_UP_PARTS},
               fusion.gate_up_columns(cfg.ffn_dim))
    else:
        for p in fusion.GATE_UP_PARTS:
            yield getattr(layer.mlp, f"{p}_proj"), {p: f"{mlp}{p}_proj"}, None
    yield layer.mlp.down_proj, {"down": f"{mlp}down_proj"}, None


def _fused(parts: dict, segments):
    return fusion.fuse(parts, segments) if segments else next(iter(parts.values()))


def load_llama(path, *, quantize: str | None = "rtn", group_size: int | None = 128,
               dtype=jnp.bfloat16, calib=None, fused: bool = True,
               progress: bool = False) -> Llama:
    """Build a ``Llama`` from a Hugging Face Llama checkpoint directory (see the module doc).

    Args:
      path: directory with config.json and *.safetensors.
      quantize: "rtn", "gptq" (needs ``calib``) or None (16-bit). Ignored for
        GPTQ checkpoints, which are 4-bit already.
      group_size: for "rtn"/"gptq": 32, 64, 128 or None (per-channel).
      dtype: activations, norms, embedding, lm_head and (except for GPTQ
        checkpoints) the int4 scales: bfloat16 or float16.
      calib: for "gptq": a list of int32 token arrays (B, T) to calibrate on.
      fused: one qkv_proj and one gate_up_proj per layer (default), or
        Hugging Face's seven projections (False).
    """
    directory = pathlib.Path(path)
    hf = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(hf).replace(fused_projections=fused)
    dtype = jnp.dtype(dtype)
    qc = hf.get("quantization_config") or {}
    gptq_ckpt = qc.get("quant_method") == "gptq"
    if gptq_ckpt:
        if qc.get("bits", 4) != 4 or not qc.get("sym", True) or qc.get("desc_act", False):
            raise ValueError(f"load_llama: GPTQ checkpoint with quantization_config {qc}: only "
                             f"bits=4, sym=True, desc_act=False can be repacked into Marlin.")
    elif quantize not in ("rtn", "gptq", None):
        raise ValueError(f'load_llama: quantize must be "rtn", "gptq" or None, got {quantize!r}.')
    if quantize == "gptq" and not gptq_ckpt and not calib:
        raise ValueError('load_llama(quantize="gptq") needs calib=[token arrays (B, T), ...].')

    t = _Tensors(directory)
    if gptq_ckpt:
        g = qc.get("group_size", 128)
        factory = dense_factory("int4", dtype, group_size=None if g in (-1, None) else g,
                                scales_dtype=jnp.float16)
    elif quantize == "rtn":
        factory = dense_factory("int4", dtype, group_size=group_size)
    else:  # 16-bit, or 16-bit first and GPTQ after
        factory = dense_factory("dense", dtype)
    model = nnx.eval_shape(lambda: Llama(cfg, dense=factory, dtype=dtype, rngs=nnx.Rngs(0)))

    _set(model.embed.embedding, t["model.embed_tokens.weight"], dtype)
    _set(model.norm.scale, t["model.norm.weight"], dtype)
    if not cfg.tie_embeddings:
        _set(model.lm_head.kernel, t["lm_head.weight"].T, dtype)
    layers = list(enumerate(model.layers))
    if progress:
        try:
            from tqdm import tqdm

            layers = tqdm(layers, desc="load", unit="layer")
        except ImportError:
            pass
    for i, layer in layers:
        _set(layer.attn_norm.scale, t[f"model.layers.{i}.input_layernorm.weight"], dtype)
        _set(layer.mlp_norm.scale, t[f"model.layers.{i}.post_attention_layernorm.weight"], dtype)
        for proj, names, segments in _projections(layer, i, cfg):
            if gptq_ckpt:
                qw = _fused({p: _gptq_weight(t, name, qc) for p, name in names.items()}, segments)
                proj.packed.set_value(qw.packed)
                proj.scales.set_value(qw.scales.astype(proj.scales.get_value().dtype))
                continue
            # Fused before quantizing: RTN scales are per column, so this is
            # exactly the parts quantized one by one and then fused.
            kernel = _fused({p: t[f"{name}.weight"].T for p, name in names.items()}, segments)
            if quantize == "rtn":
                # quantize_params on this one layer: one float kernel in memory at a time.
                q = jm.quantize_params({"kernel": jnp.asarray(kernel, dtype)}, group_size,
                                       dtype=dtype, progress=False)
                proj.packed.set_value(q["packed"])
                proj.scales.set_value(q["scales"])
            else:
                _set(proj.kernel, kernel, dtype)

    unused = [n for n in t.unused() if not n.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ValueError(f"load_llama: {len(unused)} checkpoint tensors were not used "
                         f"(e.g. {unused[:4]}): not a plain Llama checkpoint?")
    if quantize == "gptq" and not gptq_ckpt:
        model = _gptq(model, cfg, factory, dtype, group_size, calib, progress)
    return model


def _gptq_weight(t: _Tensors, name: str, qc: dict) -> jm.QuantizedWeight:
    """HF module ``name`` of a GPTQ checkpoint, repacked into the Marlin format."""
    get = lambda s: t[f"{name}.{s}"] if f"{name}.{s}" in t else None  # noqa: E731
    qw = jm.convert.from_gptq(t[f"{name}.qweight"], t[f"{name}.scales"], get("qzeros"),
                              get("g_idx"), checkpoint_format=qc.get("checkpoint_format", "gptq"))
    if get("bias") is not None and np.any(get("bias")):
        raise ValueError(f"load_llama: {name} has a non-zero bias; Llama has none.")
    return qw


def _gptq(model, cfg, factory, dtype, group_size, calib, progress):
    """The 16-bit ``model`` quantized by GPTQ on ``calib`` token batches -> int4 Llama."""
    batches = [np.asarray(b, np.int32) for b in calib]

    def call(m, tokens):
        B, T = tokens.shape
        return m(tokens, init_cache(cfg, B, T, dtype), 0, jnp.zeros((B,), jnp.int32))

    capture = jm.nnx.calibration(model, batches, call=call)
    q = jm.quantize_params(nnx.state(model, nnx.Param), group_size, method="gptq",
                           calib=capture, dtype=dtype, progress=progress)
    int4 = nnx.eval_shape(lambda: Llama(cfg, dense=dense_factory("int4", dtype, group_size=group_size),
                                        dtype=dtype, rngs=nnx.Rngs(0)))
    nnx.update(int4, q)
    return int4

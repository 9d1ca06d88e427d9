"""Flax NNX: QuantDense, a drop-in for ``nnx.Linear`` with a 4-bit Marlin weight,
and ``calibration`` to capture the inputs of a model's Linear layers for GPTQ.

Parameters (all ``nnx.Param``):
  packed  int32 (in_features // 16, 2 * out_features)   Marlin-packed codes
  scales  param_dtype (in_features // g, out_features)   permuted scales
  bias    param_dtype (out_features,)                     when use_bias

Logical axis names: the kernel's names (from ``kernel_init=nnx.with_partitioning(
init, ("embed", "mlp"))`` or ``kernel_metadata={"out_sharding": ...}``) go to
``packed`` and ``scales`` (2:4 sparse: ``values``, ``meta`` and ``scales``)
unchanged (all are laid out (K-ish, N-ish)); a
per-channel weight's single scale row gets ``(None, "mlp")``. The bias gets its
own names, or ``("mlp",)`` (the kernel's output axis) when it has none.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jax_marlin import _dense

__all__ = ["QuantDense", "calibration", "capture_dense_inputs"]

# Metadata keys flax has used for a Variable's logical axis names; newer
# versions remap the older ones to "out_sharding".
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def sharding_of(metadata: Mapping) -> tuple[str | None, Any]:
    """(metadata key, logical axis names) of a Variable's metadata, or (None, None)."""
    for key in _SHARDING_KEYS:
        if metadata.get(key):
            return key, metadata[key]
    return None, None


def _split(value):
    """An initializer's result -> (array, VariableMetadata or None)."""
    if isinstance(value, nnx.VariableMetadata):
        return value.raw_value, value
    return value, None


def _param(template, value, metadata: Mapping) -> nnx.Param:
    """nnx.Param(value) carrying the initializer's metadata (template) plus ``metadata``."""
    if template is None:
        return nnx.Param(value, **metadata)
    merged = {**template.metadata, **metadata}
    return nnx.Param(dataclasses.replace(template, raw_value=value, metadata=merged))


class QuantDense(nnx.Module):
    """``y = x @ W + b`` with W a 4-bit Marlin weight; a drop-in for ``nnx.Linear``.

    Args:
      in_features, out_features: K and N, multiples of 64.
      use_bias: add a bias (default True).
      dtype: computation dtype, float16 or bfloat16; inputs are cast to it and
        the output has it. Default: param_dtype.
      param_dtype: dtype of scales and bias, float16 or bfloat16 (default float16).
      group_size: 32, 64, 128 (default) or None (per-channel).
      kernel_init: initializer of the dense (K, N) kernel that is quantized
        (round-to-nearest) at construction; may carry partitioning metadata
        (``nnx.with_partitioning``). Load real weights with ``nnx.update`` and
        ``jax_marlin.quantize_params`` (or ``jax_marlin.convert``).
      bias_init: bias initializer.
      rngs: ``nnx.Rngs`` (stream ``params``).
      kernel_metadata, bias_metadata: extra Variable metadata, as in nnx.Linear
        (given to both ``packed`` and ``scales`` for the kernel).
      sparsity: None (dense) or "2:4": the kernel is magnitude-pruned to 2:4
        along in_features and stored as a SparseQuantizedWeight, parameters
        ``values``, ``meta``, ``scales`` instead of ``packed``, ``scales``
        (docs/SPARSE_FORMAT.md).

    Inference first: reverse-mode autodiff w.r.t. the input (and scales) works,
    through the dequantized weight; the packed codes get no gradient.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float16,
        group_size: int | None = 128,
        kernel_init: Any = nnx.initializers.lecun_normal(),
        bias_init: Any = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        sparsity: str | None = None,
    ):
        param_dtype = _dense.float16_dtype(param_dtype, "param_dtype")
        self.dtype = param_dtype if dtype is None else _dense.float16_dtype(dtype, "dtype")
        self.param_dtype = param_dtype
        _dense.check_layer(in_features, out_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.group_size = group_size
        _dense.check_sparsity(sparsity)
        self.sparsity = sparsity

        kernel, template = _split(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
        if sparsity == "2:4":
            qw = _dense.quantize_sparse_kernel(kernel, group_size, param_dtype)
        else:
            qw = _dense.quantize_kernel(kernel, group_size, param_dtype)
        metadata = {**(template.metadata if template else {}), **kernel_metadata}
        key, axes = sharding_of(metadata)
        scales_metadata = dict(kernel_metadata)
        if key is not None:
            scales_metadata[key] = _dense.scales_axes(axes, qw.is_per_channel)
        for name, leaf in _dense.weight_leaves(qw).items():
            md = scales_metadata if name == "scales" else kernel_metadata
            setattr(self, name, _param(template, leaf, md))

        if use_bias:
            bias, bias_template = _split(bias_init(rngs.params(), (out_features,), param_dtype))
            bias_md = dict(bias_metadata)
            own = {**(bias_template.metadata if bias_template else {}), **bias_md}
            if sharding_of(own)[0] is None and key is not None and axes:
                bias_md[key] = (tuple(axes)[-1],)  # the bias runs along the output axis
            self.bias = _param(bias_template, jnp.asarray(bias, param_dtype), bias_md)
        else:
            self.bias = nnx.data(None)

    def __call__(self, inputs) -> jax.Array:
        """inputs (..., in_features), any float dtype -> (..., out_features) in ``dtype``."""
        x = jnp.asarray(inputs)
        _dense.check_input(x, self.in_features)
        x = x.astype(self.dtype)
        leaves = {name: getattr(self, name)[...] for name in _dense.leaf_names(self.sparsity)}
        leaves["scales"] = leaves["scales"].astype(self.dtype)
        y = _dense.matmul(x, leaves)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


# --- Calibration: the inputs of every nnx.Linear, for GPTQ --------------------


def _call_model(model, batch):
    """Default way to run a model on one calibration batch."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _capture_fn(graphdef, call):
    """A jitted (states, batch) -> {path: inputs (n, K)} for one model structure."""

    @jax.jit
    def run(states, batch):
        m = nnx.merge(graphdef, *states)
        paths = {
            id(node): "/".join(str(p) for p in path)
            for path, node in nnx.iter_graph(m)
            if isinstance(node, nnx.Linear)
        }
        seen: dict[str, list] = {}
        original = nnx.Linear.__call__

        # nnx has no method interceptors: wrap Linear.__call__ while this
        # function is traced (restored in finally) and record by instance.
        def recording_call(self, inputs, *a, **k):
            path = paths.get(id(self))
            if path is not None:
                seen.setdefault(path, []).append(jnp.reshape(inputs, (-1, inputs.shape[-1])))
            return original(self, inputs, *a, **k)

        nnx.Linear.__call__ = recording_call
        try:
            call(m, batch)
        finally:
            nnx.Linear.__call__ = original
        return {p: _concat(xs) for p, xs in seen.items()}

    return run


def _concat(xs):
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs)


def capture_dense_inputs(model: nnx.Module, batch, *, call=None) -> dict[str, jax.Array]:
    """Run the model on one batch and return the inputs of its ``nnx.Linear`` layers.

    Args:
      model: the (float) model.
      batch: its input: an array, a tuple of positional arguments or a dict of
        keyword arguments (arrays); or anything ``call`` accepts.
      call: optional ``call(model, batch)`` that runs the model (to pass
        non-array arguments such as ``deterministic=True``).

    Returns:
      {path: inputs (n, in_features)}, ``path`` the Linear's path in the model
      ("layers/0/attn/query"), as ``quantize_params`` names layers; a layer
      called several times has its inputs concatenated.

    Layers called inside ``nnx.scan``/``nnx.vmap`` cannot be captured this way
    (their inputs are values of the inner trace): collect their inputs
    yourself and pass ``calib={path: inputs}`` to quantize_params.
    """
    graphdef, state = nnx.split(model)
    return _capture_fn(graphdef, call or _call_model)((state,), batch)


def calibration(model: nnx.Module, batches, *, call=None):
    """A ``calib`` callable for ``quantize_params(nnx.state(model, nnx.Param), method="gptq")``.

    ``batches``: model inputs, one per batch (see ``capture_dense_inputs``).
    The callable takes a param State of ``model``'s structure (quantize_params
    passes the kernels of layers already quantized as their dequantized values
    when ``sequential=True``), runs the model on every batch and returns
    {path: inputs} of its Linear layers, batches concatenated.
    """
    graphdef, own_params, rest = nnx.split(model, nnx.Param, ...)
    run = _capture_fn(graphdef, call or _call_model)
    batches = list(batches)

    def capture(params=None) -> dict[str, jax.Array]:
        states = (own_params if params is None else params, rest)
        out: dict[str, list] = {}
        for batch in batches:
            for path, x in run(states, batch).items():
                out.setdefault(path, []).append(x)
        return {p: _concat(xs) for p, xs in out.items()}

    return capture

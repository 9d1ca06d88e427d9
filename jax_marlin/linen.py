"""Flax Linen: QuantDense, a drop-in for ``nn.Dense`` with a 4-bit Marlin weight,
and ``calibration`` to capture the inputs of a model's Dense layers for GPTQ.

Parameters (collection ``params``):
  packed  int32 (in_features // 16, 2 * features)   Marlin-packed codes
  scales  param_dtype (in_features // g, features)   permuted scales
  bias    param_dtype (features,)                     when use_bias

Logical axis names: when ``kernel_init`` is wrapped by ``nn.with_partitioning``
or ``nn.with_logical_partitioning`` (say ("embed", "mlp")), ``packed`` and
``scales`` (2:4 sparse: ``values``, ``meta``, ``scales``) are boxed with the
same names (per-channel scales: (None, "mlp")),
and the bias with ``bias_init``'s names or else ("mlp",).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from jax_marlin import _dense

__all__ = ["QuantDense", "calibration", "capture_dense_inputs"]


def _names(box):
    return getattr(box, "names", None)


def _rebox(box, value, names=None):
    """``value`` in the same kind of box as ``box`` (or bare when box is None)."""
    if not isinstance(box, meta.AxisMetadata):
        return value
    if names is not None and hasattr(box, "names"):
        return box.replace(value=value, names=tuple(names))
    return box.replace_boxed(value)


def _check_group_size(scales, K: int, group_size) -> None:
    rows = meta.unbox(scales).shape[-2]
    want = 1 if group_size is None else K // group_size
    if rows != want:
        have = "None (per-channel)" if rows == 1 else str(K // rows)
        raise ValueError(
            f"QuantDense(group_size={group_size}) expects {want} rows of scales for "
            f"K = {K}, but the params have {rows}: build the layer with group_size={have}, "
            f"the group size the weights were quantized with."
        )


class QuantDense(nn.Module):
    """``y = x @ W + b`` with W a 4-bit Marlin weight; a drop-in for ``nn.Dense``.

    Attributes:
      features: N, a multiple of 64 (the input's last dimension K too).
      use_bias: add a bias (default True).
      dtype: computation dtype, float16 or bfloat16; inputs are cast to it and
        the output has it. Default: param_dtype.
      param_dtype: dtype of scales and bias, float16 or bfloat16 (default float16).
      group_size: 32, 64, 128 (default) or None (per-channel).
      kernel_init: initializer of the dense (K, N) kernel that is quantized
        (round-to-nearest) at init; may be wrapped by ``nn.with_partitioning``.
        Real weights come from ``jax_marlin.quantize_params`` or ``jax_marlin.convert``.
      bias_init: bias initializer.
      sparsity: None (dense) or "2:4": a 2:4 sparse weight (magnitude-pruned
        along K at init), params ``values``, ``meta``, ``scales``.

    Reverse-mode autodiff w.r.t. the input (and scales) works, through the
    dequantized weight; the packed codes get no gradient.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float16
    group_size: int | None = 128
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    sparsity: str | None = None

    @nn.compact
    def __call__(self, inputs) -> jax.Array:
        """inputs (..., K), any float dtype -> (..., features) in ``dtype``."""
        param_dtype = _dense.float16_dtype(self.param_dtype, "param_dtype")
        dtype = param_dtype if self.dtype is None else _dense.float16_dtype(self.dtype, "dtype")
        x = jnp.asarray(inputs)
        if x.ndim < 1:
            raise ValueError("QuantDense: the input must have at least 1 dimension (..., K).")
        K, N = x.shape[-1], self.features
        _dense.check_sparsity(self.sparsity)
        names_ = _dense.leaf_names(self.sparsity)
        first = names_[0]  # packed or values
        if self.has_variable("params", first):
            # Clear messages before Flax's own shape check of the params.
            existing = meta.unbox(self.get_variable("params", first))
            _dense.check_input(x, _dense.in_features_of(first, existing))
            _check_group_size(self.get_variable("params", "scales"), K, self.group_size)
        _dense.check_layer(K, N, self.group_size)

        g = K if self.group_size is None else self.group_size
        if self.has_variable("params", first):
            # Apply: the params exist; Flax evaluates the init functions only
            # abstractly, to check shapes. Describe the shapes, cheaply.
            def init_part(rng, part):
                shape, is_int = _dense.leaf_shape(part, K, N, g)
                return jnp.zeros(shape, jnp.int32 if is_int else param_dtype)

            names = None
        else:
            # Init: the weight's params come from one kernel draw, quantized once.
            box = self.kernel_init(self.make_rng("params"), (K, N), jnp.float32)
            if self.sparsity == "2:4":
                qw = _dense.quantize_sparse_kernel(meta.unbox(box), self.group_size, param_dtype)
            else:
                qw = _dense.quantize_kernel(meta.unbox(box), self.group_size, param_dtype)
            names = _names(box)
            made = {
                name: _rebox(box, leaf, _dense.scales_axes(names, qw.is_per_channel)
                             if name == "scales" else None)
                for name, leaf in _dense.weight_leaves(qw).items()
            }

            def init_part(rng, part):
                return made[part]

        leaves = {name: self.param(name, init_part, name) for name in names_}
        _dense.check_input(x, _dense.in_features_of(first, leaves[first]))
        leaves["scales"] = leaves["scales"].astype(dtype)
        y = _dense.matmul(x.astype(dtype), leaves)
        if self.use_bias:

            def init_bias(rng):
                box = self.bias_init(rng, (N,), param_dtype)
                if not isinstance(box, meta.AxisMetadata) and names:
                    # Unboxed bias beside a named kernel: name it after the output axis.
                    return _rebox(made[first], jnp.asarray(box, param_dtype), (tuple(names)[-1],))
                return box

            bias = self.param("bias", init_bias)
            y = y + jnp.asarray(bias).astype(dtype)
        return y


# --- Calibration: the inputs of every nn.Dense, for GPTQ ----------------------


def _apply_fn(module: nn.Module, method, call):
    """A jitted (variables, batch) -> {path: inputs (n, K)} of module's Dense layers."""

    def default_call(variables, batch):
        if isinstance(batch, dict):
            return module.apply(variables, **batch, method=method)
        if isinstance(batch, tuple):
            return module.apply(variables, *batch, method=method)
        return module.apply(variables, batch, method=method)

    call = call or default_call

    @jax.jit
    def run(variables, batch):
        seen: dict[str, list] = {}

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                x = args[0] if args else kwargs["inputs"]
                path = "/".join(str(p) for p in context.module.path)
                seen.setdefault(path, []).append(jnp.reshape(x, (-1, x.shape[-1])))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            call(variables, batch)
        return {p: xs[0] if len(xs) == 1 else jnp.concatenate(xs) for p, xs in seen.items()}

    return run


def capture_dense_inputs(module: nn.Module, variables, batch, *, method=None, call=None):
    """Apply ``module`` to one batch and return the inputs of its ``nn.Dense`` layers.

    Args:
      module: the (float) Linen module.
      variables: its variables ({"params": ...}, plus other collections).
      batch: an array, a tuple of positional arguments or a dict of keyword
        arguments for ``module.apply``.
      method: passed to ``module.apply``.
      call: optional ``call(variables, batch)`` that runs ``module.apply``
        itself (to pass non-array arguments such as ``deterministic=True``).

    Returns:
      {path: inputs (n, K)}, path the Dense's module path ("encoder/layer_0/query"),
      the path ``quantize_params`` uses for the Dense's params.

    Dense layers inside ``nn.scan``/``nn.vmap`` cannot be captured this way
    (their inputs are values of the inner trace): pass ``calib={path: inputs}``.
    """
    return _apply_fn(module, method, call)(variables, batch)


def calibration(module: nn.Module, variables, batches, *, method=None, call=None):
    """A ``calib`` callable for ``quantize_params(variables["params"], method="gptq")``.

    Runs ``module`` on each batch with the params it is given (and the other
    collections of ``variables``) and returns {path: inputs} of its Dense
    layers, batches concatenated.
    """
    run = _apply_fn(module, method, call)
    batches = list(batches)
    others = {k: v for k, v in dict(variables).items() if k != "params"}

    def capture(params=None):
        full = {**others, "params": variables["params"] if params is None else params}
        out: dict[str, list] = {}
        for batch in batches:
            for path, x in run(full, batch).items():
                out.setdefault(path, []).append(x)
        return {p: xs[0] if len(xs) == 1 else jnp.concatenate(xs) for p, xs in out.items()}

    return capture

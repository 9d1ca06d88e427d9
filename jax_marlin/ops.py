"""marlin_matmul: x @ W for a 4-bit Marlin-packed W, through the XLA FFI target.

The FFI target (CONTRACT.md) takes x as (M, K); this module checks operands,
folds leading dimensions into M, picks the CPU or CUDA call with
``jax.lax.platform_dependent``, and batches ``jax.vmap`` over x into M.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import _partitioning, dispatch, layout, sparse_layout
from jax_marlin.quantize import dequantize
from jax_marlin.quantized_weight import FLOAT_DTYPES, QuantizedWeight
from jax_marlin.sparse_quantize import dequantize_sparse
from jax_marlin.sparse_weight import SparseQuantizedWeight

# Device.platform / jax.default_backend() name -> lowering platform of our targets.
_LOWERING_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}


def _ffi():
    # Imported on first use so that pack/quantize work without the extension.
    from jax_marlin import _ffi

    _ffi.ensure_registered()
    return _ffi


def _check_operands(x, qw) -> None:
    """All Python-side checks of marlin_matmul's operands; messages say what to change."""
    if not isinstance(qw, (QuantizedWeight, SparseQuantizedWeight)):
        raise TypeError(
            f"marlin_matmul: qw must be a jax_marlin.QuantizedWeight or SparseQuantizedWeight, "
            f"got {type(qw).__name__}; build one with jax_marlin.quantize(w) / pack(codes, "
            f"scales), or quantize_sparse(w) / pack_sparse(codes, scales)."
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"marlin_matmul: x must be float16 or bfloat16, got {x.dtype}; cast it, "
            f"e.g. x.astype(qw.dtype) (qw.dtype is {qw.dtype})."
        )
    if x.dtype != qw.dtype:
        raise TypeError(
            f"marlin_matmul: x is {x.dtype} but the weight's scales are {qw.dtype}; "
            f"they must match. Use qw.astype(x.dtype) (or cast x to {qw.dtype})."
        )
    if x.ndim < 1:
        raise ValueError("marlin_matmul: x must have at least 1 dimension (..., K); got a scalar.")
    if qw.scales.ndim != 2:
        raise ValueError(
            f"marlin_matmul: qw is a stack of weights (scales shape "
            f"{tuple(qw.scales.shape)}); pass one weight at a time, e.g. with "
            f"jax.lax.scan or jax.lax.map over the stack."
        )
    K, N = qw.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"marlin_matmul: x's last dimension is {x.shape[-1]} but the weight "
            f"has K = {K} input rows (weight shape (K, N) = {qw.shape}); x must be (..., {K})."
        )


def _check_backend(x) -> None:
    """Raise RuntimeError if this build has no kernel for the platform x will run on."""
    try:
        platform = next(iter(x.devices())).platform
    except jax.errors.ConcretizationTypeError:
        # Traced: the default backend is the best guess before lowering.
        platform = jax.default_backend()
    target = _LOWERING_PLATFORM.get(platform, platform)
    backends = _ffi().BACKENDS
    if target not in backends:
        hint = (
            "Rebuild jax_marlin with CUDA (pip install . on a machine with nvcc; "
            "JAX_MARLIN_DISABLE_CUDA must not be set)."
            if target == "cuda"
            else "jax_marlin supports only CPU and CUDA."
        )
        raise RuntimeError(
            f"marlin_matmul: no jax_marlin kernel for platform {platform!r}; this "
            f"build has kernels for {sorted(backends)}. {hint}"
        )


def _cpu_call(x2, packed, scales):
    M, N = x2.shape[0], scales.shape[1]
    out = jax.ShapeDtypeStruct((M, N), x2.dtype)
    return jax.ffi.ffi_call(_ffi().TARGET, out)(x2, packed, scales)


def _gpu_kind() -> str:
    try:
        return jax.devices("gpu")[0].device_kind
    except RuntimeError:  # no GPU backend: this branch is traced, never run
        return ""


def _dense_call(x2, packed, scales, *, on_cuda: bool = False):
    """Dequantize once and let XLA run a dense GEMM.

    on_cuda: dequantize with the CUDA target (the caller runs on a CUDA
    device), not with XLA's fusion of jax_marlin.dequantize: the same bits,
    written at close to copy bandwidth. The GEMM writes the 16-bit output
    itself (cuBLAS accumulates in float32 either way): asking for a float32
    result and casting it back made XLA write and re-read a float32 (M, N)
    as well, 8% more time at M = 2048 on 8192 x 57344 (H100,
    benchmarks/dense_path_probe.py).
    """
    if on_cuda:
        w = _cuda_dequantize(packed, scales)
    else:
        w = dequantize(QuantizedWeight(packed=packed, scales=scales))
    return _dot_16bit(x2, w)


def _cuda_dequantize(packed, scales):
    """jax_marlin.dequantize as one CUDA kernel (the FFI target; CUDA devices only)."""
    K, N = QuantizedWeight(packed=packed, scales=scales).shape
    return jax.ffi.ffi_call(_ffi().DEQUANTIZE_TARGET, jax.ShapeDtypeStruct((K, N), scales.dtype))(
        packed, scales)


def _dot_16bit(x2, w):
    """x2 @ w in x2's dtype, float32 accumulation (XLA's default for 16-bit dots)."""
    return jnp.dot(x2, w, preferred_element_type=x2.dtype)


def _cuda_call(x2, packed, scales):
    (M, K), N = x2.shape, scales.shape[1]
    # Large M: the measured table (dispatch.py) may send it to a dense GEMM.
    if dispatch.use_dense(_gpu_kind(), M, K, N, np.dtype(x2.dtype).name):
        return _dense_call(x2, packed, scales, on_cuda=True)
    return _kernel_call(x2, packed, scales)


def _kernel_call(x2, packed, scales):
    """The CUDA Marlin kernel through the FFI target."""
    (M, K), N = x2.shape, scales.shape[1]
    outs = (
        jax.ShapeDtypeStruct((M, N), x2.dtype),
        # Scratch for the kernel's cross-block partial sums (discarded here).
        jax.ShapeDtypeStruct((_ffi().cuda_workspace_floats(M, K, N),), jnp.float32),
    )
    # rows/cols size the call's lock buffer, made once when XLA instantiates it.
    y, _ = jax.ffi.ffi_call(_ffi().TARGET, outs)(
        x2, packed, scales, rows=np.int64(M), cols=np.int64(N))
    return y


def _varying_axes(*arrays) -> set:
    """The manual mesh axes (inside shard_map) any of ``arrays`` varies over."""
    axes = set()
    for a in arrays:
        aval = jax.typeof(a)
        varying = getattr(aval, "vma", None)
        if varying is None:  # newer jax: the manual axis type holds them
            varying = getattr(getattr(aval, "mat", None), "varying", ())
        axes |= set(varying or ())
    return axes


def _varying_like_operands(call):
    """``call`` whose result varies over every manual mesh axis its operands do.

    An FFI call's result carries no such axes (jax cannot see inside it), an
    XLA dot's carries its operands'; inside shard_map the branches of
    ``platform_dependent`` (kernel vs dequantize + dot) must agree, and a
    psum needs its operand marked varying. At run time this is nothing.
    """

    def varying_call(*operands):
        y = call(*operands)
        missing = tuple(sorted(_varying_axes(*operands) - _varying_axes(y)))
        return jax.lax.pcast(y, missing, to="varying") if missing else y

    return varying_call


_CALLS = {"cpu": _cpu_call, "cuda": _cuda_call}


def _local_matmul(x, packed, scales):
    """x (..., K) @ W -> (..., N), one kernel call with M = prod(leading dims).

    Called with the whole operands, or with one device's shards of them.
    """
    K, N = x.shape[-1], scales.shape[-1]
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M == 0:  # nothing to compute; the kernel needs M >= 1
        return jnp.zeros((*lead, N), x.dtype)
    calls = {p: _varying_like_operands(_CALLS[p]) for p in _ffi().BACKENDS}
    y = jax.lax.platform_dependent(x.reshape(M, K), packed, scales, **calls)
    return y.reshape(*lead, N)


# Under jax.jit with sharded operands each device runs _local_matmul on its
# shards instead of XLA gathering the weight (rules in _partitioning.py); on
# one device, and inside shard_map, it is _local_matmul itself.
_partitioned_matmul = _partitioning.partitioned(_local_matmul, _partitioning.DENSE)


@jax.custom_batching.custom_vmap
def _matmul(x, packed, scales):
    return _partitioned_matmul(x, packed, scales)


@_matmul.def_vmap
def _matmul_vmap(axis_size, in_batched, x, packed, scales):
    _, packed_batched, scales_batched = in_batched
    if packed_batched or scales_batched:
        raise NotImplementedError(
            "marlin_matmul: vmap over the quantized weight is not supported (the "
            "kernel takes one weight); loop over weights with jax.lax.map instead, "
            "e.g. jax.lax.map(lambda qw: marlin_matmul(x, qw), stacked_qw)."
        )
    # custom_vmap has moved x's batch axis to the front: fold it into M.
    return _matmul(x, packed, scales), True


_matmul_jit = jax.jit(_matmul)


# Reverse-mode autodiff: the kernel only computes x @ W, so the backward pass
# uses the dequantized weight (dX = dY @ W_hat^T), accumulating in float32
# like the forward. The scales get their gradient too; the integer codes none.
@jax.custom_vjp
def _differentiable_matmul(x, packed, scales):
    return _matmul_jit(x, packed, scales)


def _differentiable_matmul_fwd(x, packed, scales):
    return _matmul_jit(x, packed, scales), (x, packed, scales)


def _grads_through_dequantized(x, dy, w, codes, scales, permute_scales):
    """dx and d(scales) of y = x @ W_hat, W_hat[k, n] = (code[k, n] - 8) * s[k // g, n],
    computed through the dequantized weight ``w`` with float32 sums. dS[j, n] is the
    sum over group j's rows of (code - 8) * dW, with dW = X^T dY; then into the
    kernel's scale order (a permutation, so its gradient is permuted alike)."""
    hi = jax.lax.Precision.HIGHEST
    dx = jnp.einsum("...n,kn->...k", dy, w, precision=hi, preferred_element_type=jnp.float32)
    K, N = w.shape
    G = scales.shape[-2]
    dw = jnp.einsum("mk,mn->kn", x.reshape(-1, K), dy.reshape(-1, N), precision=hi,
                    preferred_element_type=jnp.float32)
    values = codes.astype(jnp.float32) - layout.CODE_OFFSET
    ds = jnp.sum((values * dw).reshape(G, K // G, N), axis=1)
    return dx.astype(x.dtype), permute_scales(ds.astype(scales.dtype))


def _no_grad(a):
    return np.zeros(a.shape, dtype=jax.dtypes.float0)  # integer inputs


def _differentiable_matmul_bwd(res, dy):
    x, packed, scales = res
    w = dequantize(QuantizedWeight(packed=packed, scales=scales))  # (K, N), activations' dtype
    dx, ds = _grads_through_dequantized(x, dy, w, layout.unpack_codes(packed), scales,
                                        layout.permute_scales)
    return dx, _no_grad(packed), ds


_differentiable_matmul.defvjp(_differentiable_matmul_fwd, _differentiable_matmul_bwd)


# --- 2:4 sparse weights (issue 8) ---------------------------------------------------
# The same stack as above (custom_vjp -> jit -> custom_vmap -> partitioning ->
# one call per platform) for the three arrays of a SparseQuantizedWeight.


def _sparse_cpu_call(x2, values, meta, scales):
    M, N = x2.shape[0], scales.shape[1]
    out = jax.ShapeDtypeStruct((M, N), x2.dtype)
    return jax.ffi.ffi_call(_ffi().SPARSE_TARGET, out)(x2, values, meta, scales)


def _sparse_dense_call(x2, values, meta, scales):
    """Dequantize the sparse weight once and let XLA run a dense GEMM (as _dense_call)."""
    w = dequantize_sparse(SparseQuantizedWeight(values=values, meta=meta, scales=scales))
    return _dot_16bit(x2, w)


def _sparse_kernel_call(x2, values, meta, scales):
    """The CUDA 2:4 sparse kernel (mma.sp.m16n8k32) through the FFI target."""
    (M, K), N = x2.shape, scales.shape[1]
    outs = (
        jax.ShapeDtypeStruct((M, N), x2.dtype),
        # Scratch for the kernel's cross-block partial sums (discarded here).
        jax.ShapeDtypeStruct((_ffi().cuda_sparse_workspace_floats(M, K, N),), jnp.float32),
    )
    y, _ = jax.ffi.ffi_call(_ffi().SPARSE_TARGET, outs)(
        x2, values, meta, scales, rows=np.int64(M), cols=np.int64(N))
    return y


def _sparse_cuda_call(x2, values, meta, scales):
    (M, K), N = x2.shape, scales.shape[1]
    # Large M: a measured table (dispatch.py, entries with "format": "sparse")
    # may send it to dequantize + dot; without one the kernel always runs.
    if dispatch.use_dense(_gpu_kind(), M, K, N, np.dtype(x2.dtype).name, fmt="sparse"):
        return _sparse_dense_call(x2, values, meta, scales)
    return _sparse_kernel_call(x2, values, meta, scales)


_SPARSE_CALLS = {"cpu": _sparse_cpu_call, "cuda": _sparse_cuda_call}


def _local_sparse_matmul(x, values, meta, scales):
    K, N = x.shape[-1], scales.shape[-1]
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M == 0:
        return jnp.zeros((*lead, N), x.dtype)
    calls = {p: _varying_like_operands(_SPARSE_CALLS[p]) for p in _ffi().BACKENDS}
    y = jax.lax.platform_dependent(x.reshape(M, K), values, meta, scales, **calls)
    return y.reshape(*lead, N)


# Same partitioning rules as the dense weight, over the sparse type's three leaves.
_partitioned_sparse_matmul = _partitioning.partitioned(_local_sparse_matmul, _partitioning.SPARSE)


@jax.custom_batching.custom_vmap
def _sparse_matmul(x, values, meta, scales):
    return _partitioned_sparse_matmul(x, values, meta, scales)


@_sparse_matmul.def_vmap
def _sparse_matmul_vmap(axis_size, in_batched, x, values, meta, scales):
    if any(in_batched[1:]):
        raise NotImplementedError(
            "marlin_matmul: vmap over the quantized weight is not supported (the "
            "kernel takes one weight); loop over weights with jax.lax.map instead, "
            "e.g. jax.lax.map(lambda w: marlin_matmul(x, w), stacked_weights)."
        )
    return _sparse_matmul(x, values, meta, scales), True


_sparse_matmul_jit = jax.jit(_sparse_matmul)


@jax.custom_vjp
def _differentiable_sparse_matmul(x, values, meta, scales):
    return _sparse_matmul_jit(x, values, meta, scales)


def _differentiable_sparse_matmul_fwd(x, values, meta, scales):
    return _sparse_matmul_jit(x, values, meta, scales), (x, values, meta, scales)


def _differentiable_sparse_matmul_bwd(res, dy):
    x, values, meta, scales = res
    w = dequantize_sparse(SparseQuantizedWeight(values=values, meta=meta, scales=scales))
    dx, ds = _grads_through_dequantized(x, dy, w, sparse_layout.unpack_codes(values, meta), scales,
                                        sparse_layout.permute_scales)
    return dx, _no_grad(values), _no_grad(meta), ds


_differentiable_sparse_matmul.defvjp(_differentiable_sparse_matmul_fwd, _differentiable_sparse_matmul_bwd)


def marlin_matmul(x, qw: QuantizedWeight | SparseQuantizedWeight) -> jax.Array:
    """y = x @ W, W the (K, N) 4-bit weight in ``qw``, via the Marlin kernel.

    Args:
      x: (..., K) float16 or bfloat16; must match ``qw.dtype`` (use
        ``qw.astype(x.dtype)`` to switch a weight's dtype).
      qw: a QuantizedWeight, or a SparseQuantizedWeight (2:4 sparse: the
        mma.sp kernel on CUDA, issue 8).

    Returns:
      (..., N) in x's dtype; accumulation is in float32.

    Leading dimensions of x are folded into one kernel call. ``jax.vmap`` over
    x is supported (its batch axis is folded in too); ``jax.vmap`` over the
    weight raises NotImplementedError: use ``jax.lax.map`` over the weights.
    Reverse-mode differentiation (``jax.grad``, ``jax.vjp``) w.r.t. x and the
    scales works, through the dequantized weight; forward mode does not.

    On a GPU whose kind has a measured dispatch table (``jax_marlin.dispatch``),
    calls with many rows may run as dequantize + XLA's dot instead, where that
    was measured to be faster.

    Under ``jax.jit`` with sharded operands each device runs the kernel on its
    shard (data, column and row parallel, for both weight types; the weight is
    never gathered), and inside ``shard_map`` it runs on the local shards: see
    ``jax_marlin.sharding``.
    """
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    _check_operands(x, qw)
    _check_backend(x)
    if isinstance(qw, SparseQuantizedWeight):
        return _differentiable_sparse_matmul(x, qw.values, qw.meta, qw.scales)
    return _differentiable_matmul(x, qw.packed, qw.scales)


def marlin_matmul_reference(x, qw: QuantizedWeight) -> jax.Array:
    """Pure-jnp reference: float32 ``x @ dequantize(qw)``, cast to x's dtype."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    _check_operands(x, qw)
    w = dequantize(qw).astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)

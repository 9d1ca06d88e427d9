"""GPTQ (Frantar et al., 2022) for the Marlin format, in JAX.

Quantizes a (K, N) weight one input row k at a time, in the order k = 0..K-1,
and pushes each row's rounding error onto the rows not yet quantized, using
the inverse Hessian ``H = 2 X^T X / n`` of the layer's inputs X (n, K): the
layer's output error ``||X W - X W_hat||`` is what it minimizes, not the
weight error. The steps:

- dampening: ``H += damp * mean(diag H) * I`` (and inputs that are always 0
  get ``H[k, k] = 1``), so that the Cholesky factorizations exist;
- ``U``: the upper Cholesky factor of ``H^-1``; row k of U gives the error
  propagation weights of row k, ``U[k, k]`` its scale;
- blocks of ``block_size`` rows: inside a block the update is applied row by
  row; the rest of the weight gets the block's accumulated error in one
  matmul ("lazy batch" updates);
- group scales are chosen inside the loop, when the first row of a group is
  reached, from the group's rows as updated so far, with the same rule as
  ``jax_marlin.quantize`` (``s = max|w| / 7`` rounded to the scales' dtype),
  so that with a diagonal Hessian GPTQ returns exactly ``quantize(w)``.

With ``sparsegpt_quantize`` the same loop also prunes to 2:4 along K, as
SparseGPT (Frantar & Alistarh, 2023) does: when a chunk of 4 rows is reached,
each column keeps the two rows of largest saliency ``w^2 / U[k, k]^2`` (w as
updated so far) and drops the other two (their value 0 is the "quantized"
value whose error is pushed onto later rows, the OBS update); the kept rows
are quantized as in GPTQ. A group's scale is taken over the entries that the
same saliency rule would keep at the group's first row.

Two jitted programs per layer shape: the factorization (per K) and the
quantization loop (per K, N, group size, dtype); layers of one shape share them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_marlin import layout, sparse_layout
from jax_marlin.quantize import _quantize_arrays, check_float_weight
from jax_marlin.quantized_weight import QuantizedWeight
from jax_marlin.sparse_weight import SparseQuantizedWeight

_HI = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in these f32 matmuls on GPU


def hessian(x) -> jax.Array:
    """``2 X^T X / n`` (K, K) float32 for inputs x (..., K) (all leading dims are samples)."""
    x = jnp.asarray(x)
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    n = max(x2.shape[0], 1)
    return _gram(x2) * (2.0 / n)


@jax.jit
def _gram(x2):
    return jnp.matmul(x2.T, x2, precision=_HI)


def gptq_quantize(
    w,
    h,
    group_size: int | None = 128,
    *,
    dtype=None,
    damp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ-quantize a (K, N) weight given the Hessian ``h`` (K, K) of its inputs.

    Args:
      w: float (K, N) weight (the ``x @ w`` convention).
      h: (K, K) Hessian, e.g. ``hessian(x)`` of the layer's calibration inputs.
      group_size: 32, 64, 128, or None (per-channel), as in ``quantize``.
      dtype: scales' dtype, float16 (default unless w is bfloat16) or bfloat16.
      damp: dampening, as a fraction of the mean diagonal of h.
      block_size: rows per lazy-update block (a multiple of the group size).

    Returns:
      A QuantizedWeight (the same format as ``quantize``).
    """
    codes, scales = _run("gptq_quantize", w, h, group_size, dtype, damp, block_size, sparse=False)
    return QuantizedWeight(packed=layout.pack_codes(codes), scales=layout.permute_scales(scales))


def sparsegpt_quantize(
    w,
    h,
    group_size: int | None = 128,
    *,
    dtype=None,
    damp: float = 0.01,
    block_size: int = 128,
) -> SparseQuantizedWeight:
    """SparseGPT 2:4 pruning along K with GPTQ quantization of the kept entries.

    Arguments as for ``gptq_quantize``; returns a SparseQuantizedWeight (the
    format of ``jax_marlin.quantize_sparse``). The 2:4 mask is chosen per
    chunk of 4 input rows by the OBS saliency ``w^2 / [H^-1 Cholesky]_kk^2``
    of the weights as updated so far, and every dropped or rounded entry's
    error is compensated on the rows not yet processed.
    """
    codes, scales = _run("sparsegpt_quantize", w, h, group_size, dtype, damp, block_size, sparse=True)
    values, meta = sparse_layout.pack_codes(codes)
    return SparseQuantizedWeight(values=values, meta=meta, scales=sparse_layout.permute_scales(scales))


def _run(name, w, h, group_size, dtype, damp, block_size, *, sparse: bool):
    """Checks, then the GPTQ loop: (codes (K, N) uint8, natural-order scales)."""
    w = jnp.asarray(w)
    h = jnp.asarray(h, jnp.float32)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}: w must be a 2-D float array (K, N), got {w.dtype}{tuple(w.shape)}.")
    K, N = w.shape
    if h.shape != (K, K):
        raise ValueError(
            f"{name}: the Hessian must be (K, K) = ({K}, {K}) for a weight of shape "
            f"{(K, N)}, got {tuple(h.shape)}; build it from the layer's inputs (..., {K})."
        )
    _, g, dtype = check_float_weight(w, group_size, dtype, name)
    if not damp >= 0:
        raise ValueError(f"{name}: damp must be >= 0, got {damp}.")
    layout.check_shape(K, N, g)
    block = _block_rows(K, g, block_size)
    codes, scales, ok = _gptq(w.astype(jnp.float32), h, jnp.float32(damp), g, block, dtype, sparse)
    if not bool(ok):
        raise ValueError(
            f"{name}: the dampened Hessian is not positive definite (Cholesky "
            f"failed) for a weight of shape {(K, N)}; increase damp (now {damp}), "
            f"e.g. damp=0.1, or give more calibration samples."
        )
    return codes, scales


def _block_rows(K: int, g: int, block_size: int) -> int:
    """Rows per block: block_size if it fits K and the groups, else the tile (64) or g."""
    for b in (block_size, 128, 64, g):
        if 0 < b <= K and K % b == 0 and (g == K or b % g == 0):
            return b
    return g  # unreachable for supported shapes (K % 64 == 0, g divides K)


def _scale_rows(rows, dtype):
    """The scale quantize() gives this group of rows (g, N) -> (N,) float32, rounded to dtype."""
    _, s = _quantize_arrays(rows, rows.shape[0], dtype)
    # The barrier keeps the rounding to dtype (XLA may drop a convert pair).
    return jax.lax.optimization_barrier(s[0]).astype(jnp.float32)


@jax.jit
def _upper_inverse_cholesky(h, damp):
    """(U, ok): U upper triangular with H^-1 = U^T U, after dampening H.

    With J the row/column flip, chol(J H J) = L gives H = M M^T for the upper
    M = J L J, so H^-1 = M^-T M^-1 and U = M^-1: one Cholesky and one
    triangular solve, no explicit inverse.
    """
    K = h.shape[0]
    eye = jnp.eye(K, dtype=jnp.float32)
    diag = jnp.diag(h)
    # An input that is always zero carries no information: make its row
    # independent (H[k, k] = 1) instead of singular.
    h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
    h = h + damp * jnp.mean(jnp.diag(h)) * eye
    lower = jax.lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)
    m = lower[::-1, ::-1]
    u = jax.lax.linalg.triangular_solve(m, eye, left_side=True, lower=False)
    ok = jnp.all(jnp.isfinite(u))
    return jnp.where(ok, u, eye), ok  # keep the loop finite; the caller raises


def _gptq(w, h, damp, g: int, block: int, dtype, sparse: bool = False):
    u, ok = _upper_inverse_cholesky(h, damp)
    codes, scales = _gptq_loop(w, u, g, block, dtype, sparse)
    return codes, scales, ok


def _keep_by_saliency(rows, u_diag):
    """2:4 mask of rows (4m, N): the two largest w^2 / U[k, k]^2 of each chunk of 4."""
    return sparse_layout.prune_mask(rows * rows / (u_diag[:, None] * u_diag[:, None]))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _gptq_loop(w, u, g: int, block: int, dtype, sparse: bool = False):
    K, N = w.shape
    per_channel = g == K
    u_diag = jnp.diag(u)
    if per_channel:
        rows = jnp.where(_keep_by_saliency(w, u_diag), w, 0.0) if sparse else w
        fixed_scale = _scale_rows(rows, dtype)
    else:
        fixed_scale = None
    groups_per_block = 1 if per_channel else block // g
    rows_per_group = block if per_channel else g

    def quantize_row(wj, s):
        q = jnp.clip(jnp.round(wj / s) + layout.CODE_OFFSET, 0, layout.CODE_MAX)
        return q, (q - layout.CODE_OFFSET) * s

    def block_step(b, carry):
        w, codes, scales = carry
        i1 = b * block
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (block, N))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))
        q1 = jnp.zeros((block, N), jnp.float32)
        err1 = jnp.zeros((block, N), jnp.float32)

        def row_step(j, state):
            w1, q1, err1, s = state
            wj = w1[j]
            q, wq = quantize_row(wj, s)
            e = (wj - wq) / u1[j, j]
            # U is upper triangular: rows before j are untouched.
            w1 = w1 - u1[j][:, None] * e[None, :]
            return w1, q1.at[j].set(q), err1.at[j].set(e), s

        def chunk_step(c, state):
            # SparseGPT: choose this chunk's 2:4 mask from the current weights,
            # then quantize (kept) or drop (pruned) its 4 rows one by one.
            w1, q1, err1, s = state
            r = 4 * c
            rows = jax.lax.dynamic_slice(w1, (r, 0), (4, N))
            d = jax.lax.dynamic_slice(jnp.diag(u1), (r,), (4,))
            keep = _keep_by_saliency(rows, d)
            for i in range(4):
                j = r + i
                wj = w1[j]
                q, wq = quantize_row(wj, s)
                q = jnp.where(keep[i], q, float(layout.CODE_OFFSET))
                wq = jnp.where(keep[i], wq, 0.0)
                e = (wj - wq) / u1[j, j]
                w1 = w1 - u1[j][:, None] * e[None, :]
                q1, err1 = q1.at[j].set(q), err1.at[j].set(e)
            return w1, q1, err1, s

        def group_step(gi, state):
            w1, q1, err1, scales = state
            r0 = gi * rows_per_group
            if per_channel:
                s = fixed_scale
            else:
                # The group's scale, from its rows as updated so far (sparse:
                # those the saliency rule would keep now).
                rows = jax.lax.dynamic_slice(w1, (r0, 0), (g, N))
                if sparse:
                    d = jax.lax.dynamic_slice(jnp.diag(u1), (r0,), (g,))
                    rows = jnp.where(_keep_by_saliency(rows, d), rows, 0.0)
                s = _scale_rows(rows, dtype)
                scales = jax.lax.dynamic_update_slice(scales, s[None].astype(dtype), ((i1 + r0) // g, 0))
            if sparse:
                w1, q1, err1, _ = jax.lax.fori_loop(
                    r0 // 4, (r0 + rows_per_group) // 4, chunk_step, (w1, q1, err1, s))
            else:
                w1, q1, err1, _ = jax.lax.fori_loop(r0, r0 + rows_per_group, row_step, (w1, q1, err1, s))
            return w1, q1, err1, scales

        # A loop, not a Python unroll, over the block's groups: one compiled
        # body whatever the group size.
        w1, q1, err1, scales = jax.lax.fori_loop(0, groups_per_block, group_step, (w1, q1, err1, scales))

        codes = jax.lax.dynamic_update_slice(codes, q1.astype(jnp.uint8), (i1, 0))
        # Lazy update of all later rows at once. U[i1:i2, :i1] is zero, and
        # the block's own rows are already final, so updating every row is
        # simpler than slicing a dynamic remainder and changes nothing read later.
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (block, K))
        w = w - jnp.matmul(u_rows.T, err1, precision=_HI)
        return w, codes, scales

    codes = jnp.zeros((K, N), jnp.uint8)
    scales = jnp.zeros((K // g, N), dtype)
    if per_channel:
        scales = fixed_scale[None].astype(dtype)
    _, codes, scales = jax.lax.fori_loop(0, K // block, block_step, (w, codes, scales))
    return codes, scales


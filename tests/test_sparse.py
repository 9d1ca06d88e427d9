"""2:4 sparse INT4 weights (issue 8): format, pruning, CPU handler, errors, autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm
from jax_marlin import _partitioning
from jax_marlin import sparse_layout as sl

DTYPES = [jnp.float16, jnp.bfloat16]
TOLERANCE = {np.dtype(jnp.float16): 2e-3, np.dtype(jnp.bfloat16): 1e-2}


def random_sparse_codes(seed, K, N, *, fill=1.0):
    """Random 2:4 codes: a random 2-of-4 mask along K, codes 0..15 on it (8 elsewhere).

    ``fill`` < 1 zeroes some kept codes too (chunks with fewer than two non-zeros).
    """
    rng = np.random.default_rng(seed)
    keys = rng.random((K // 4, 4, N))
    rank = np.argsort(np.argsort(keys, axis=1), axis=1)
    mask = (rank < 2).reshape(K, N) & (rng.random((K, N)) < fill)
    codes = rng.integers(0, 16, (K, N)).astype(np.uint8)
    return np.where(mask, codes, 8).astype(np.uint8)


def random_scales(seed, K, N, g, dtype):
    G = 1 if g is None else K // g
    return np.random.default_rng(seed).uniform(0.005, 0.015, (G, N)).astype(dtype)


def numpy_reference(x, codes, scales):
    """float32 x @ W_hat, W_hat = (code - 8) * s rounded to the activation dtype, in numpy only."""
    K, N = codes.shape
    G = scales.shape[0]
    s = np.repeat(scales.astype(np.float32), K // G, axis=0)
    w_hat = ((codes.astype(np.float32) - 8) * s).astype(scales.dtype).astype(np.float32)
    return np.asarray(x, np.float32).astype(np.float64) @ w_hat.astype(np.float64)


def rel_err(y, ref):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert np.all(np.isfinite(y))
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# --- Format -------------------------------------------------------------------------


@pytest.mark.parametrize("K,N", [(64, 64), (128, 192), (256, 128)])
@pytest.mark.parametrize("fill", [1.0, 0.6])
def test_pack_unpack_round_trip(K, N, fill):
    codes = random_sparse_codes(K + N, K, N, fill=fill)
    scales = random_scales(1, K, N, 32, np.float16)
    sqw = jm.pack_sparse(codes, scales)
    assert sqw.values.shape == (K // 32, 2 * N) and sqw.values.dtype == jnp.int32
    assert sqw.meta.shape == (K // 32, N) and sqw.meta.dtype == jnp.int32
    assert sqw.shape == (K, N) and sqw.group_size == 32
    c, s = jm.unpack_sparse(sqw)
    np.testing.assert_array_equal(np.asarray(c), codes)
    np.testing.assert_array_equal(np.asarray(s), scales)
    again = jm.pack_sparse(c, s)
    np.testing.assert_array_equal(np.asarray(again.values), np.asarray(sqw.values))
    np.testing.assert_array_equal(np.asarray(again.meta), np.asarray(sqw.meta))


def test_metadata_is_always_valid():
    """Two distinct, increasing positions per chunk (0b0000, 0b0101, ... are undefined in PTX)."""
    codes = random_sparse_codes(3, 128, 128, fill=0.3)
    codes[:8] = 8  # whole chunks of zeros
    sqw = jm.pack_sparse(codes, random_scales(0, 128, 128, None, np.float16))
    words = np.asarray(sqw.meta).view(np.uint32)
    for shift in range(0, 32, 4):
        nib = (words >> shift) & 0xF
        assert np.all((nib & 3) < (nib >> 2))


def test_whole_tile_slices_are_valid_weights():
    """Column slices of 64 and row slices of 32 (whole groups) pack to the slices of the packed arrays."""
    K, N = 256, 256
    codes = random_sparse_codes(5, K, N)
    scales = random_scales(6, K, N, 64, np.float16)
    full = jm.pack_sparse(codes, scales)
    cols = jm.pack_sparse(codes[:, 64:192], scales[:, 64:192])
    np.testing.assert_array_equal(np.asarray(cols.values), np.asarray(full.values)[:, 128:384])
    np.testing.assert_array_equal(np.asarray(cols.meta), np.asarray(full.meta)[:, 64:192])
    np.testing.assert_array_equal(np.asarray(cols.scales), np.asarray(full.scales)[:, 64:192])
    rows = jm.pack_sparse(codes[64:192], scales[1:3])
    np.testing.assert_array_equal(np.asarray(rows.values), np.asarray(full.values)[2:6])
    np.testing.assert_array_equal(np.asarray(rows.meta), np.asarray(full.meta)[2:6])
    np.testing.assert_array_equal(np.asarray(rows.scales), np.asarray(full.scales)[1:3])
    # A slice of exactly one group is, as it stands, the per-channel weight of
    # its rows: the sparse layout orders one scale row like several (the dense
    # one does not: tests/test_sharding.py::test_row_slices_are_packed_weights),
    # so a row shard holding one group needs no reordering.
    one = jm.pack_sparse(codes[64:128], scales[1:2])
    np.testing.assert_array_equal(np.asarray(one.values), np.asarray(full.values)[2:4])
    np.testing.assert_array_equal(np.asarray(one.scales), np.asarray(full.scales)[1:2])
    assert _partitioning.SPARSE.one_group_scales is None
    # and the kernel computes with the slices what it computes with the whole
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, K)), jnp.float16)
    y = np.asarray(jm.marlin_matmul(x, full), np.float32)
    y_cols = np.asarray(jm.marlin_matmul(x, jm.SparseQuantizedWeight(
        values=full.values[:, 128:384], meta=full.meta[:, 64:192], scales=full.scales[:, 64:192])), np.float32)
    np.testing.assert_array_equal(y_cols, y[:, 64:192])


def _emulated_mma_sp_a(values, meta, nb):
    """W^T of n-block nb of one run (16 x 32), rebuilt as mma.sp.m16n8k32 (f16) would see it.

    Lane l = 4g + t: its value word for n-block nb is word 4l + nb; the
    dequant gives registers a_r = (element 2r, 2r + 1) from nibbles (r, r + 4).
    Compressed A element f of lane (g, t) is row g + 8 ((f // 2) % 2), compressed
    column 8 (f // 4) + 2t + f % 2 (the m16n8k16 A layout); compressed column c
    is slot c % 2 of chunk c // 2. Metadata (sparsity selector nb % 2, register
    nb // 2): lanes 4g + 2 sel + h give chunks 4h..4h+3, rows g ([15:0]) and
    g + 8 ([31:16]), 4 bits a chunk, slot 0 in the low two bits.
    """
    a = np.zeros((16, 32), np.int64)
    sel, reg = nb % 2, nb // 2
    pos = {}
    for g in range(8):
        for h in range(2):
            word = int(meta[2 * (4 * g + 2 * sel + h) + reg])
            for half, row in ((0, g), (1, g + 8)):
                for c in range(4):
                    nib = (word >> (16 * half + 4 * c)) & 0xF
                    pos[(row, 4 * h + c, 0)] = nib & 3
                    pos[(row, 4 * h + c, 1)] = nib >> 2
    for lane in range(32):
        g, t = divmod(lane, 4)
        word = int(values[4 * lane + nb])
        nibbles = [(word >> (4 * j)) & 0xF for j in range(8)]
        element = []
        for r in range(4):
            element += [nibbles[r], nibbles[r + 4]]
        for f in range(8):
            row = g + 8 * ((f // 2) % 2)
            c = 8 * (f // 4) + 2 * t + f % 2
            chunk, slot = divmod(c, 2)
            a[row, 4 * chunk + pos[(row, chunk, slot)]] = element[f] - 8
    return a


def test_layout_matches_mma_sp_fragments():
    """Each lane's words, read as mma.sp.m16n8k32 A fragments and metadata, give W^T."""
    K, N = 64, 128
    codes = random_sparse_codes(11, K, N)
    sqw = jm.pack_sparse(codes, random_scales(0, K, N, 32, np.float16))
    values = np.asarray(sqw.values).view(np.uint32)
    meta = np.asarray(sqw.meta).view(np.uint32)
    for band in range(K // 32):
        for run in range(N // 64):
            v = values[band, 128 * run: 128 * (run + 1)]
            m = meta[band, 64 * run: 64 * (run + 1)]
            for nb in range(4):
                n0 = 64 * run + 16 * nb
                want = codes[32 * band: 32 * (band + 1), n0: n0 + 16].T.astype(np.int64) - 8
                np.testing.assert_array_equal(_emulated_mma_sp_a(v, m, nb), want)


def test_scales_in_grouped_order_for_every_group_size():
    """Lane g reads scales of n-rows g + 8 j at positions 8 g + j of each run of 64."""
    for g in (32, None):
        scales = random_scales(2, 128, 128, g, np.float16)
        codes = random_sparse_codes(1, 128, 128)
        permuted = np.asarray(jm.pack_sparse(codes, scales).scales)
        for lane_g in range(8):
            for j in range(8):
                np.testing.assert_array_equal(permuted[:, 64 + 8 * lane_g + j],
                                              scales[:, 64 + lane_g + 8 * j])


def test_byte_counts():
    b = sl.nbytes(4096, 4096, 128)
    assert b["values"] == 4096 * 4096 // 4  # half the codes, 4 bits
    assert b["meta"] == 4096 * 4096 // 8  # 4 bits per chunk of 4
    assert b["scales"] == 32 * 4096 * 2
    sqw = jm.quantize_sparse(np.ones((128, 64), np.float32), 64)
    assert sqw.values.nbytes + sqw.meta.nbytes == sum(
        v for k, v in sl.nbytes(128, 64, 64).items() if k in ("values", "meta"))


# --- Pruning and quantization -------------------------------------------------------


@pytest.mark.parametrize("g", [32, 128, None])
def test_quantize_sparse_prunes_two_of_four_by_magnitude(g):
    rng = np.random.default_rng(4)
    K, N = 256, 128
    w = rng.standard_normal((K, N)).astype(np.float32)
    sqw = jm.quantize_sparse(w, g)
    codes, scales = (np.asarray(a) for a in jm.unpack_sparse(sqw))
    nonzero = (codes != 8).reshape(K // 4, 4, N)
    assert nonzero.sum(axis=1).max() <= 2
    # The kept entries are the two largest |w| of their chunk.
    a = np.abs(w).reshape(K // 4, 4, N)
    second = np.sort(a, axis=1)[:, 2:3, :]  # 2nd largest
    assert np.all(a[nonzero] >= np.broadcast_to(second, a.shape)[nonzero])
    mask = np.asarray(sl.prune_mask(w)).reshape(K // 4, 4, N)
    assert np.all(mask.sum(axis=1) == 2) and np.all(mask | ~nonzero)
    # Same scales and codes as dense RTN of the pruned weight.
    dense = jm.quantize(np.where(mask.reshape(K, N), w, 0), g, dtype=jnp.float16)
    dcodes, dscales = (np.asarray(a) for a in jm.unpack(dense))
    np.testing.assert_array_equal(codes, dcodes)
    np.testing.assert_array_equal(scales, dscales)
    # |w - w_hat| <= s / 2 on the kept entries
    w_hat = np.asarray(jm.dequantize(sqw), np.float32)
    s = np.repeat(scales.astype(np.float32), K // scales.shape[0], axis=0)
    kept = mask.reshape(K, N)
    assert np.all(np.abs(w - w_hat)[kept] <= s[kept] / 2 + 1e-3 * s[kept])
    assert np.all(w_hat[~kept] == 0)


# --- The CPU handler ----------------------------------------------------------------


CASES = [
    (M, K, N, g, dtype)
    for M in (1, 3, 17, 70)
    for (K, N, g) in ((64, 64, 32), (128, 192, 64), (256, 128, 128), (192, 320, None))
    for dtype in DTYPES
]


@pytest.mark.parametrize("M,K,N,g,dtype", CASES)
def test_cpu_handler_matches_numpy_reference(M, K, N, g, dtype):
    seed = M * 1000 + K + N
    codes = random_sparse_codes(seed, K, N, fill=0.9)
    scales = random_scales(seed + 1, K, N, g, dtype)
    x = np.random.default_rng(seed + 2).standard_normal((M, K)).astype(dtype)
    y = jm.marlin_matmul(jnp.asarray(x), jm.pack_sparse(codes, scales))
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, numpy_reference(x, codes, scales)) <= TOLERANCE[np.dtype(dtype)]


def test_cpu_handler_large_m_and_threads():
    codes = random_sparse_codes(9, 512, 1024)
    scales = random_scales(9, 512, 1024, 128, np.float16)
    x = np.random.default_rng(9).standard_normal((300, 512)).astype(np.float16)
    y = jax.jit(jm.marlin_matmul)(jnp.asarray(x), jm.pack_sparse(codes, scales))
    assert rel_err(y, numpy_reference(x, codes, scales)) <= 2e-3


def test_sparse_is_the_dense_kernel_on_the_pruned_weight():
    """The sparse and dense CPU handlers agree bit for bit on the same pruned codes.

    Pinned to the CPU: on a GPU the two CUDA kernels split K differently
    (mma.sp against mma.sync), so they agree only to rounding there."""
    codes = random_sparse_codes(12, 256, 192)
    scales = random_scales(12, 256, 192, 64, np.float16)
    with jax.default_device(jax.devices("cpu")[0]):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((9, 256)), jnp.float16)
        ys = jm.marlin_matmul(x, jm.pack_sparse(codes, scales))
        yd = jm.marlin_matmul(x, jm.pack(codes, scales))
    np.testing.assert_array_equal(np.asarray(ys, np.float32), np.asarray(yd, np.float32))


def test_leading_dims_vmap_and_jit():
    sqw = jm.quantize_sparse(np.random.default_rng(0).standard_normal((128, 128)), 64)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 128)), jnp.float16)
    y = jm.marlin_matmul(x, sqw)
    assert y.shape == (2, 3, 128)
    yv = jax.vmap(lambda xi: jm.marlin_matmul(xi, sqw))(x)
    yj = jax.jit(jm.marlin_matmul)(x, sqw)
    np.testing.assert_array_equal(np.asarray(yv, np.float32), np.asarray(y, np.float32))
    np.testing.assert_array_equal(np.asarray(yj, np.float32), np.asarray(y, np.float32))
    assert jm.marlin_matmul(jnp.zeros((0, 128), jnp.float16), sqw).shape == (0, 128)


def test_vmap_over_sparse_weight_raises():
    sqw = jm.quantize_sparse(np.ones((64, 64), np.float32), 32)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), sqw)
    x = jnp.ones((2, 64), jnp.float16)
    with pytest.raises(NotImplementedError, match="vmap over the quantized weight"):
        jax.vmap(jm.marlin_matmul)(x, stacked)
    ys = jax.lax.map(lambda w: jm.marlin_matmul(x, w), stacked)
    assert ys.shape == (2, 2, 64)


@pytest.mark.parametrize("g", [32, None])
def test_grad_matches_dequantized_reference(g):
    rng = np.random.default_rng(3)
    sqw = jm.quantize_sparse(rng.standard_normal((128, 64)).astype(np.float32), g)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float16)

    def loss(x, scales):
        w = jm.SparseQuantizedWeight(values=sqw.values, meta=sqw.meta, scales=scales)
        return jnp.sum(jm.marlin_matmul(x, w).astype(jnp.float32) ** 2)

    def ref_loss(x, scales):
        w = jm.SparseQuantizedWeight(values=sqw.values, meta=sqw.meta, scales=scales)
        y = x.astype(jnp.float32) @ jm.dequantize(w).astype(jnp.float32)
        return jnp.sum(y.astype(jnp.float16).astype(jnp.float32) ** 2)

    gx, gs = jax.grad(loss, argnums=(0, 1))(x, sqw.scales)
    rx, rs = jax.grad(ref_loss, argnums=(0, 1))(x, sqw.scales)
    assert rel_err(gx, np.asarray(rx, np.float64)) < 1e-2
    assert rel_err(gs, np.asarray(rs, np.float64)) < 1e-2


def test_pytree_checkpoint_and_astype(tmp_path):
    from flax import serialization

    sqw = jm.quantize_sparse(np.random.default_rng(0).standard_normal((64, 128)), None)
    leaves = jax.tree_util.tree_leaves(sqw)
    assert len(leaves) == 3
    back = serialization.from_bytes(sqw, serialization.to_bytes(sqw))
    for a, b in zip(leaves, jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf = sqw.astype(jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16 and bf.values is sqw.values
    assert jm.marlin_matmul(jnp.ones((1, 64), jnp.bfloat16), bf).dtype == jnp.bfloat16


# --- Errors -----------------------------------------------------------------------------


def test_pack_sparse_rejects_dense_codes_naming_the_group():
    codes = random_sparse_codes(0, 64, 64)
    codes[8:12, 5] = [1, 2, 3, 8]  # three non-zeros in group 2 of column 5
    with pytest.raises(ValueError, match=r"rows 8\.\.11 \(group 2 of 4 along K\) of column 5 hold 3"):
        jm.pack_sparse(codes, random_scales(0, 64, 64, 32, np.float16))


@pytest.mark.parametrize(
    "codes,scales,error,match",
    [
        (np.full((64, 64), 8.0), np.ones((2, 64), np.float16), TypeError, "integer array"),
        (np.full((64,), 8, np.uint8), np.ones((2, 64), np.float16), ValueError, "2-D"),
        (np.full((96, 64), 8, np.uint8), np.ones((3, 64), np.float16), ValueError, "K = 96"),
        (np.full((64, 96), 8, np.uint8), np.ones((2, 96), np.float16), ValueError, "N = 96"),
        (np.full((64, 64), 8, np.uint8), np.ones((2, 64), np.float32), TypeError, "float16 or bfloat16"),
        (np.full((64, 64), 8, np.uint8), np.ones((2, 128), np.float16), ValueError, "columns"),
        (np.full((64, 64), 16, np.uint8), np.ones((2, 64), np.float16), ValueError, "0..15"),
    ],
)
def test_pack_sparse_errors(codes, scales, error, match):
    with pytest.raises(error, match=match):
        jm.pack_sparse(codes, scales)


def test_sparse_weight_validates_arrays():
    sqw = jm.quantize_sparse(np.ones((64, 64), np.float32), 32)
    with pytest.raises(TypeError, match="values must be int32"):
        jm.SparseQuantizedWeight(values=sqw.values.astype(jnp.uint32), meta=sqw.meta, scales=sqw.scales)
    with pytest.raises(ValueError, match=r"values must be \(K // 32, 2 \* N\)"):
        jm.SparseQuantizedWeight(values=sqw.values[:, :64], meta=sqw.meta, scales=sqw.scales)


def test_matmul_errors_at_trace_time():
    sqw = jm.quantize_sparse(np.ones((64, 64), np.float32), 32)
    with pytest.raises(TypeError, match=r"qw.astype"):
        jm.marlin_matmul(jnp.ones((2, 64), jnp.bfloat16), sqw)
    with pytest.raises(ValueError, match="must be \\(..., 64\\)"):
        jax.jit(jm.marlin_matmul)(jnp.ones((2, 32), jnp.float16), sqw)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        jm.marlin_matmul(jnp.ones((2, 64), jnp.float32), sqw)


def test_quantize_sparse_errors():
    with pytest.raises(ValueError, match="group_size"):
        jm.quantize_sparse(np.ones((64, 64), np.float32), 48)
    with pytest.raises(TypeError, match="float array"):
        jm.quantize_sparse(np.ones((64, 64), np.int32))
    with pytest.raises(ValueError, match="N = 32"):
        jm.quantize_sparse(np.ones((64, 32), np.float32))


def test_sharding_on_8_cpu_devices(util):
    util.run_on_8_cpu_devices("multidevice_sparse.py")

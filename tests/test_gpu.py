"""The CUDA kernel at Llama shapes (marked `gpu`: skipped where jax.devices() has no GPU)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm

pytestmark = pytest.mark.gpu

# (K, N) of Llama projections: attention qkv (7B), mlp down (7B), mlp up (70B).
LLAMA_SHAPES = [(4096, 12288), (11008, 4096), (8192, 28672)]
ALL_M = [1, 7, 16, 33, 64, 128, 1000]
FEW_M = [1, 33, 1000]  # for the other dtype/group combinations: keeps the run short

CASES = [(K, N, M, jnp.float16, 128) for K, N in LLAMA_SHAPES for M in ALL_M] + [
    (K, N, M, dtype, g)
    for dtype, g in [(jnp.float16, None), (jnp.bfloat16, 128), (jnp.bfloat16, None)]
    for K, N in LLAMA_SHAPES
    for M in FEW_M
]


def _case_id(case):
    K, N, M, dtype, g = case
    return f"K{K}-N{N}-M{M}-{np.dtype(dtype).name}-{'ch' if g is None else f'g{g}'}"


@pytest.fixture(scope="module")
def weights(util):
    """Weights built once per (K, N, group, dtype) and kept on the GPU."""
    return functools.lru_cache(maxsize=None)(
        lambda K, N, g, dtype: util.random_weight(K * 7 + N, K, N, g, dtype)
    )


def test_cuda_kernel_is_built():
    assert jax.default_backend() == "gpu"
    assert "cuda" in jm.backends(), "this build has no CUDA kernel: rebuild with nvcc on PATH"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_llama_shapes(case, weights, util):
    K, N, M, dtype, g = case
    qw = weights(K, N, g, dtype)
    x = util.random_x(M, (M, K), dtype)
    y = jax.jit(jm.marlin_matmul)(x, qw)
    util.assert_close(y, x, qw)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("K,N,g", [(64, 64, 32), (256, 576, 64), (512, 1088, 128),
                                   (4096, 4096, 128), (1024, 1536, None)])
def test_cuda_dequantize_is_bit_exact(K, N, g, dtype, util):
    """The dense path's CUDA dequantize gives jax_marlin.dequantize's bits:
    every group layout, N with a partial last block of 512 columns."""
    from jax_marlin import ops

    qw = util.random_weight(K + N, K, N, g, dtype)
    w = jax.jit(ops._cuda_dequantize)(qw.packed, qw.scales)
    assert w.dtype == np.dtype(dtype) and w.shape == (K, N)
    np.testing.assert_array_equal(np.asarray(w.astype(jnp.float32)),
                                  np.asarray(jm.dequantize(qw).astype(jnp.float32)))


@pytest.mark.parametrize("K,N", LLAMA_SHAPES)
def test_kernel_itself_at_large_m(K, N, weights, util):
    """marlin_matmul may hand large M to dequantize + dot (the measured table,
    jax_marlin/dispatch_tables/): the kernel's own path is checked here
    directly (on sm_90a the prefill kernel where pick_prefill_shape says so; else the chunks)."""
    from jax_marlin import ops

    qw = weights(K, N, 128, jnp.float16)
    x = util.random_x(7, (1000, K), jnp.float16)
    y = jax.jit(ops._kernel_call)(x, qw.packed, qw.scales)
    util.assert_close(y, x, qw)


@pytest.mark.parametrize("M", [128, 200])
def test_kernel_itself_where_prefill_splits_k(M, weights, util):
    """11008x4096 at M = 128 and 200 has too few output tiles to fill 132 SMs:
    on sm_90a the prefill kernel splits K over up to 4 blocks a tile
    (pick_prefill_shape), whose parts the last block sums in split order:
    checked against the reference, and bit-identical when run again."""
    from jax_marlin import ops

    qw = weights(11008, 4096, 128, jnp.float16)
    x = util.random_x(400 + M, (M, 11008), jnp.float16)
    call = jax.jit(ops._kernel_call)
    y = call(x, qw.packed, qw.scales)
    util.assert_close(y, x, qw)
    again = call(x, qw.packed, qw.scales)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(again).view(np.uint16))


@pytest.mark.parametrize("g", [128, None])
def test_chunks_at_large_m(g, weights, util, tmp_path):
    """M = 1000 through the 128-row chunks (JAX_MARLIN_PREFILL=0, read once
    a process: a fresh one), which the prefill kernel replaces on sm_90a."""
    K, N = 4096, 12288
    qw = weights(K, N, g, jnp.float16)
    x = util.random_x(8, (1000, K), jnp.float16)
    np.savez(tmp_path / "in.npz", x=np.asarray(x), packed=np.asarray(qw.packed), scales=np.asarray(qw.scales))
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from jax_marlin import ops
        d = np.load({str(tmp_path / "in.npz")!r})
        y = jax.jit(ops._kernel_call)(*(jax.numpy.asarray(d[k]) for k in ("x", "packed", "scales")))
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(y))
        """
    )
    env = dict(os.environ, JAX_MARLIN_PREFILL="0", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    util.assert_close(jnp.asarray(np.load(tmp_path / "out.npy")), x, qw)


def test_dispatch_table_decides_the_path():
    from jax_marlin import dispatch

    kind = jax.devices("gpu")[0].device_kind
    qw = jm.pack(jnp.zeros((4096, 12288), jnp.uint8), jnp.ones((32, 12288), jnp.float16))
    for M in (1, 4096):
        text = jax.jit(jm.marlin_matmul).lower(jnp.zeros((M, 4096), jnp.float16), qw).as_text()
        dense = dispatch.use_dense(kind, M, 4096, 12288, "float16")
        assert ("@jax_marlin_matmul" not in text) == dense, (kind, M)


@pytest.mark.parametrize("M", FEW_M)
def test_deterministic(M, weights, util):
    qw = weights(8192, 28672, 128, jnp.float16)
    x = util.random_x(100 + M, (M, 8192), jnp.float16)
    a = np.asarray(jm.marlin_matmul(x, qw))
    b = np.asarray(jm.marlin_matmul(x, qw))
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("M", [1, 33, 1000])
def test_output_fully_written(M, weights, util):
    """Run right after freeing a NaN-filled buffer of the output's size, so a
    kernel that skips part of y would leave NaN (the allocator reuses memory)."""
    K, N = 4096, 12288
    qw = weights(K, N, 128, jnp.float16)
    x = util.random_x(200 + M, (M, K), jnp.float16)
    poison = jnp.full((M, N), jnp.nan, jnp.float16).block_until_ready()
    poison.delete()
    y = jm.marlin_matmul(x, qw)
    assert not np.any(np.isnan(np.asarray(y, np.float32)))
    util.assert_close(y, x, qw)


def test_jit_inside_scan(weights, util):
    """Many kernel calls in one program (XLA's default flags: command buffers on)."""
    qw = weights(4096, 12288, 128, jnp.float16)
    xs = util.random_x(300, (6, 16, 4096), jnp.float16)

    @jax.jit
    def run(xs, qw):
        def body(total, x):
            y = jm.marlin_matmul(x, qw)
            return total + jnp.sum(y, dtype=jnp.float32), y

        return jax.lax.scan(body, jnp.float32(0), xs)

    total, ys = run(xs, qw)
    for i in range(xs.shape[0]):
        util.assert_close(ys[i], xs[i], qw)
        np.testing.assert_array_equal(ys[i], jm.marlin_matmul(xs[i], qw))
    assert np.isfinite(total)


def test_chained_scan(weights, util):
    """Each step's input is the previous step's output: ordering between calls matters."""
    qw = weights(4096, 4096, 128, jnp.float16)
    x = util.random_x(401, (33, 4096), jnp.float16)
    steps = 4
    ys = jax.jit(
        lambda x, qw: jax.lax.scan(lambda h, _: (jm.marlin_matmul(h, qw),) * 2, x, None, length=steps)[1]
    )(x, qw)
    h = x
    for i in range(steps):
        h_next = jm.marlin_matmul(h, qw)
        util.assert_close(h_next, h, qw)
        np.testing.assert_array_equal(ys[i], h_next)
        h = h_next


def test_same_result_without_command_buffers(weights, util, tmp_path):
    """The scan above again in a fresh process with command buffers off; same bits."""
    qw = weights(4096, 12288, 128, jnp.float16)
    x = util.random_x(500, (64, 4096), jnp.float16)
    np.savez(tmp_path / "in.npz", x=np.asarray(x), packed=np.asarray(qw.packed), scales=np.asarray(qw.scales))
    script = textwrap.dedent(
        f"""
        import jax, numpy as np, jax_marlin as jm
        d = np.load({str(tmp_path / "in.npz")!r})
        qw = jm.QuantizedWeight(packed=jax.numpy.asarray(d["packed"]), scales=jax.numpy.asarray(d["scales"]))
        f = jax.jit(lambda x, qw: jax.lax.scan(lambda c, _: (c, jm.marlin_matmul(x, qw)), 0, None, length=3)[1])
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(f(jax.numpy.asarray(d["x"]), qw)))
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    # This process already holds XLA's preallocated share of the GPU memory:
    # the child allocates only what it uses.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    out = np.load(tmp_path / "out.npy")
    expected = np.asarray(jm.marlin_matmul(x, qw))
    for i in range(3):
        np.testing.assert_array_equal(out[i].view(np.uint16), expected.view(np.uint16))


def test_inside_forced_command_buffer(weights, tmp_path):
    """With command buffers forced on for custom calls (graph size 1), XLA
    records calls into a CUDA graph (the handler counts executions whose
    stream was being captured: the compiled HLO text no longer shows command
    buffers), and the bits equal an eager call's, in a scan and in a program
    of several calls; the same program with a 2:4 weight counts as many."""
    qw = weights(4096, 4096, 128, jnp.float16)
    x = np.random.default_rng(7).standard_normal((16, 4096)).astype(np.float16)
    np.savez(tmp_path / "in.npz", x=x, packed=np.asarray(qw.packed), scales=np.asarray(qw.scales))
    script = textwrap.dedent(
        f"""
        import jax, numpy as np, jax_marlin as jm
        from jax_marlin import _ffi
        d = np.load({str(tmp_path / "in.npz")!r})
        qw = jm.QuantizedWeight(packed=jax.numpy.asarray(d["packed"]), scales=jax.numpy.asarray(d["scales"]))
        def step(c, _):
            return c, jm.marlin_matmul(c, qw)
        f = jax.jit(lambda x: jax.lax.scan(step, x, None, length=3)[1])
        x = jax.numpy.asarray(d["x"])
        out = np.asarray(f(x))
        np.save({str(tmp_path / "out.npy")!r}, out)
        # Four calls in a row with their own x: a command buffer of calls.
        g = jax.jit(lambda x: [jm.marlin_matmul(x * (i + 1), qw) for i in range(4)])
        counts = [_ffi._ext.cuda_captured_calls()]
        for _ in range(3):  # XLA may record a command buffer only after a first run
            out_g = g(x)
        np.save({str(tmp_path / "out_g.npy")!r}, np.asarray(out_g[1]))
        counts.append(_ffi._ext.cuda_captured_calls())
        # The same program with a 2:4 sparse weight: its handler counts alike.
        quantize = jax.jit(jm.quantize_sparse, static_argnums=1, static_argnames="dtype")
        sqw = quantize(jax.random.normal(jax.random.key(3), (4096, 4096)) * 0.02, 128,
                       dtype=jax.numpy.float16)
        h = jax.jit(lambda x: [jm.marlin_matmul(x * (i + 1), sqw) for i in range(4)])
        for _ in range(3):  # as for g: each output kept until the next run's is made
            out_h = h(x)
        jax.block_until_ready(out_h)
        counts.append(_ffi._ext.cuda_captured_calls())
        open({str(tmp_path / "captured.txt")!r}, "w").write(" ".join(map(str, counts)))
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    ).strip()
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # as above: this process holds the memory
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    out = np.load(tmp_path / "out.npy")
    expected = np.asarray(jm.marlin_matmul(jnp.asarray(x), qw))
    np.testing.assert_array_equal(out[0].view(np.uint16), expected.view(np.uint16))
    expected_g = np.asarray(jm.marlin_matmul(jnp.asarray(x) * 2, qw))
    np.testing.assert_array_equal(np.load(tmp_path / "out_g.npy").view(np.uint16),
                                  expected_g.view(np.uint16))
    # On jax 0.11.2 (H200) XLA recorded the calls only in a later run of a
    # program, hence the three runs above; the handler declares itself compatible.
    before, after_dense, after_sparse = map(int, (tmp_path / "captured.txt").read_text().split())
    assert after_dense > before, (f"jax {jax.__version__}: XLA ran the Marlin call outside any "
                                  "CUDA graph capture under forced command-buffer flags")
    # Each handler counts a captured execution once (the count also decides
    # that the launch does not overlap: MarlinProblem::may_overlap).
    assert after_sparse - after_dense == after_dense - before, (before, after_dense, after_sparse)


def test_cp_async_path_gives_the_same_bits(weights, util, tmp_path):
    """On Hopper the kernels take x by TMA; JAX_MARLIN_TMA=0 (read once per
    process) makes them load it by cp.async, the path Ampere runs. The two
    stage the same values in the same order, so every row count, dense and
    2:4, both dtypes, must give the same bits. Both run in subprocesses with
    JAX_MARLIN_WGMMA=0, which keeps the mma.sync tiles where the dense
    dispatch would take wgmma (32-64 rows on compute capability 9.0: other
    bits, a different summation order); this process's own products, on
    whatever tiles the device takes, must be right too."""
    cases = [(jnp.float16, 128), (jnp.bfloat16, None)]
    rows = [1, 33, 128]  # the row variants' three kinds of tile (M <= 16, 32-64, 128)
    weights_of = {}
    arrays = {}
    for i, (dtype, g) in enumerate(cases):
        qw = weights(4096, 12288, g, dtype)
        sqw = jm.quantize_sparse(jax.random.normal(jax.random.key(i), (4096, 4096)) * 0.02, g,
                                 dtype=dtype)
        weights_of[i] = (qw, sqw)
        arrays.update({f"packed{i}": qw.packed, f"scales{i}": qw.scales})
        arrays.update({f"values{i}": sqw.values, f"meta{i}": sqw.meta, f"sscales{i}": sqw.scales})
        for M in rows:
            arrays[f"x{i}_{M}"] = util.random_x(M, (M, 4096), dtype)
    # 16-bit floats travel as float32 (exact; numpy has no bfloat16).
    np.savez(tmp_path / "in.npz", **{
        k: np.asarray(v if v.dtype == jnp.int32 else v.astype(jnp.float32)) for k, v in arrays.items()})
    script = textwrap.dedent(
        f"""
        import jax, numpy as np, jax_marlin as jm
        d = np.load({str(tmp_path / "in.npz")!r})
        out = {{}}
        for i, dtype in enumerate({[np.dtype(dtype).name for dtype, _ in cases]}):
            a = lambda k: jax.numpy.asarray(d[k], None if d[k].dtype == np.int32 else dtype)
            qw = jm.QuantizedWeight(packed=a(f"packed{{i}}"), scales=a(f"scales{{i}}"))
            sqw = jm.SparseQuantizedWeight(values=a(f"values{{i}}"), meta=a(f"meta{{i}}"),
                                           scales=a(f"sscales{{i}}"))
            for M in {rows}:
                x = a(f"x{{i}}_{{M}}")
                out[f"dense{{i}}_{{M}}"] = np.asarray(jm.marlin_matmul(x, qw)).view(np.uint16)
                out[f"sparse{{i}}_{{M}}"] = np.asarray(jm.marlin_matmul(x, sqw)).view(np.uint16)
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        """
    )
    def products(**flags):
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_MARLIN_WGMMA="0", **flags)
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
        return dict(np.load(tmp_path / "out.npz"))

    by_tma, out = products(), products(JAX_MARLIN_TMA="0")
    for i, (dtype, g) in enumerate(cases):
        qw, sqw = weights_of[i]
        for M in rows:
            x = jnp.asarray(arrays[f"x{i}_{M}"])
            for name, w in (("dense", qw), ("sparse", sqw)):
                util.assert_close(jm.marlin_matmul(x, w), x, w)
                np.testing.assert_array_equal(
                    out[f"{name}{i}_{M}"], by_tma[f"{name}{i}_{M}"],
                    err_msg=f"{name} {np.dtype(dtype).name} group {g} M={M}: cp.async and TMA differ")

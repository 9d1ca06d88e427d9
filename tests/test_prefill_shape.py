"""The prefill kernel's launch choice (prefill_shape_for in
csrc/cuda/prefill_dispatch.cu) from the shapes alone, for a Hopper GPU of a
given SM count: checked on any machine whose extension has the CUDA code."""

import pytest

from jax_marlin import _ffi

pytestmark = pytest.mark.skipif(not _ffi._ext.has_cuda(), reason="extension built without CUDA")

# Issue 4's layer sets (K, N): Llama-2-7B, then Llama-2-70B.
LLAMA_7B = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]
LLAMA_70B = [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]
H100_SMS = 132


def shape(m, k, n, group=128, sms=H100_SMS, sparse=False):
    return _ffi._ext.cuda_prefill_shape(m, k, n, group, sms, sparse)


def blocks(s, m, n):
    return -(-m // s["tile_rows"]) * (n // s["tile_cols"]) * s["splits"]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("sms", [H100_SMS, 114, 78])
@pytest.mark.parametrize("M", [64, 100, 128, 200, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("K,N", LLAMA_7B + LLAMA_70B)
def test_launch_fits_the_layer_and_splits_only_into_one_wave(K, N, M, sms, sparse):
    """Whole tiles of N; 1 to 4 shares of K, each at least one 64-deep stage;
    a split launch never has more blocks than SMs (the workspace is sized
    for that: prefill_partial_floats_bound). The 2x2 tile (variant 1) is
    never picked: it has no K split and no 2:4 form."""
    for group in (128, K):
        s = shape(M, K, N, group, sms, sparse)
        if s is None:
            continue
        assert s["variant"] != 1 and N % s["tile_cols"] == 0 and s["tile_rows"] in (64, 128)
        assert 1 <= s["splits"] <= 4 and s["splits"] <= K // 64
        if s["splits"] > 1:
            assert blocks(s, M, N) <= sms


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("K,N", LLAMA_7B + LLAMA_70B)
def test_prompt_sized_m_keeps_whole_k_tiles_of_128_rows(K, N, sparse):
    """At M = 2048 every Llama layer has waves of tiles to spare: no split, the
    128-row tiles measured in session 27."""
    s = shape(2048, K, N, sparse=sparse)
    assert s is not None and s["splits"] == 1 and s["tile_rows"] == 128


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("K,N", LLAMA_70B)
def test_70b_layers_at_m128_keep_the_sms_busy(K, N, sparse):
    """M = 128 is one row of tiles: the K split fills the SMs that N alone
    leaves idle (8192x8192 has 64 tiles of 128 columns), to at least 80% of
    the launch's waves."""
    s = shape(128, K, N, sparse=sparse)
    assert s is not None
    b = blocks(s, 128, N)
    assert b / (-(-b // H100_SMS) * H100_SMS) >= 0.8


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("M", [1, 16, 32])
def test_small_m_stays_on_the_chunks(M, sparse):
    """Too few rows to fill even a 64-row tile: the Marlin kernel's chunks."""
    for K, N in LLAMA_7B + LLAMA_70B:
        assert shape(M, K, N, sparse=sparse) is None


def test_dense_picks_at_m128_on_two_70b_layers():
    """The choices benchmarks/NOTES.md reasons about (session 28): 28672x8192
    in 4x1 tiles split 4 ways, 8192x8192 in 2x1 tiles split 2 ways. New
    stage times from a GPU bench may change them: then change them here."""
    assert (shape(128, 28672, 8192)["variant"], shape(128, 28672, 8192)["splits"]) == (0, 4)
    assert (shape(128, 8192, 8192)["variant"], shape(128, 8192, 8192)["splits"]) == (2, 2)


def test_unsupported_shapes_and_devices_have_no_launch():
    assert shape(2048, 8192, 8192, group=96) is None  # no such group size
    assert shape(2048, 8200, 8192) is None  # K not a multiple of 64
    assert shape(2048, 8192, 8192, sms=0) is None

"""Shared test set-up: the `gpu` marker, hypothesis profiles, data helpers."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import types

# `python -m pytest` from the repository root puts the root on sys.path, and
# its jax_marlin/ (sources only, no compiled _ext) would shadow the installed
# package. Test the installed package unless the tree holds a built _ext.
ROOT = pathlib.Path(__file__).resolve().parents[1]
if not any((ROOT / "jax_marlin").glob("_ext*")):
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or os.getcwd()).resolve() != ROOT]

import hypothesis  # noqa: E402  (after the sys.path fix above)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax_marlin as jm  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN_FILES = sorted(DATA.glob("*.npz"))

# "ci" (default) keeps the suite to a few minutes on CPU; "dev" is quicker,
# "thorough" for a long local run: HYPOTHESIS_PROFILE=thorough pytest ...
hypothesis.settings.register_profile("ci", max_examples=30, deadline=None, print_blob=True)
hypothesis.settings.register_profile("dev", max_examples=8, deadline=None)
hypothesis.settings.register_profile("thorough", max_examples=300, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when jax.devices() has none)")


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no GPU in jax.devices()")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- helpers, handed to tests through the `util` fixture ----------------------

TOLERANCE = {np.dtype(jnp.float16): 2e-3, np.dtype(jnp.bfloat16): 1e-2}


# Test data comes from numpy's generator: jax.random's programs take seconds
# to compile for each new shape, which hypothesis would pay per example.


def random_weight(seed, K, N, group_size, dtype) -> jm.QuantizedWeight:
    """Random codes over the full 0..15 range and positive scales around 0.01."""
    rng = np.random.default_rng(seed)
    G = 1 if group_size is None else K // group_size
    codes = rng.integers(0, 16, (K, N), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.015, (G, N)).astype(dtype)
    return jm.pack(jnp.asarray(codes), jnp.asarray(scales))


def random_x(seed, shape, dtype) -> jax.Array:
    """Standard normal activations (never all zero)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))


def stack(weights) -> jm.QuantizedWeight:
    """A stack of same-shaped weights (one QuantizedWeight with a leading axis)."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *weights)


@jax.jit
def reference_f32(x, qw) -> jax.Array:
    """x @ W_hat in float32 at full precision (no TF32 on GPU)."""
    w = jm.dequantize(qw).astype(jnp.float32)
    return jnp.matmul(jnp.asarray(x, jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(y)), "output has NaN/inf"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# Largest relative error seen per (backend, dtype), reported after the run.
WORST_ERROR: dict = {}


def assert_close(y, x, qw):
    """y (marlin_matmul(x, qw)) matches the float32 reference within the dtype's tolerance."""
    assert y.shape == x.shape[:-1] + (qw.shape[1],) and y.dtype == x.dtype
    err = rel_err(y, reference_f32(x, qw))
    key = (jax.default_backend(), np.dtype(x.dtype).name)
    WORST_ERROR[key] = max(err, WORST_ERROR.get(key, 0.0))
    assert err <= TOLERANCE[np.dtype(x.dtype)], f"relative error {err:.3g}"


def pytest_terminal_summary(terminalreporter):
    if WORST_ERROR:
        terminalreporter.write_sep("-", "max relative error vs the float32 reference")
        for (backend, dtype), err in sorted(WORST_ERROR.items()):
            terminalreporter.write_line(f"{backend} {dtype}: {err:.3g}")


def run_on_8_cpu_devices(test_file: str) -> None:
    """Run tests/<test_file> with pytest in a child process that sees 8 CPU
    devices (this process initialised jax with one); fail with its output."""
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / test_file)]
    run = subprocess.run(cmd, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=900)
    print("8-device run:", (run.stdout.strip().splitlines() or ["(no output)"])[-1])
    assert run.returncode == 0, (f"{' '.join(cmd)} failed (exit {run.returncode}):\n"
                                 f"{run.stdout[-20000:]}\n{run.stderr[-5000:]}")


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py of the repository, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def util():
    return types.SimpleNamespace(
        random_weight=random_weight,
        random_x=random_x,
        stack=stack,
        reference_f32=reference_f32,
        rel_err=rel_err,
        assert_close=assert_close,
        TOLERANCE=TOLERANCE,
        run_on_8_cpu_devices=run_on_8_cpu_devices,
        load_script=load_script,
    )


@pytest.fixture(scope="session", params=GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def golden(request):
    with np.load(request.param) as f:
        return {k: f[k] for k in f.files}

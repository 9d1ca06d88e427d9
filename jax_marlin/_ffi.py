"""Registration of the compiled XLA FFI handlers (jax_marlin._ext) with JAX.

The extension exports one capsule per (platform, target); this module hands
them to ``jax.ffi.register_ffi_target``. Importing it needs no GPU: the CUDA
handler is registered only when the build contains it, and registering a
target for a platform JAX has no device for is harmless.
"""

from __future__ import annotations

import threading

import jax

_HOW_TO_BUILD = (
    "Build and install the package with `python -m pip install .` from the repository "
    "root (with nvcc on PATH the CUDA kernel is built too)."
)


def _import_ext():
    try:
        from jax_marlin import _ext

        return _ext
    except ImportError:
        pass
    # A source checkout's jax_marlin/ has no compiled _ext, yet it shadows the
    # installed package whenever the checkout is on sys.path first (as with
    # `python -m pytest tests` run from the repository root after
    # `pip install .`). Then take _ext from the installed copy: extend_path
    # adds every other `jax_marlin` folder on sys.path to the package's path
    # (the checkout's Python files keep priority).
    import pkgutil

    import jax_marlin

    jax_marlin.__path__[:] = pkgutil.extend_path(list(jax_marlin.__path__), jax_marlin.__name__)
    try:
        from jax_marlin import _ext

        return _ext
    except ImportError as e:  # no build anywhere, or a broken one
        raise ImportError(
            f"jax_marlin's compiled extension (jax_marlin._ext) could not be imported: {e}. "
            + _HOW_TO_BUILD
        ) from e


_ext = _import_ext()

TARGET = "jax_marlin_matmul"
SPARSE_TARGET = "jax_marlin_sparse_matmul"  # 2:4 sparse weights
DEQUANTIZE_TARGET = "jax_marlin_dequantize"  # CUDA only: the dense weight, for large M

# _ext names platforms as jax.ffi.register_ffi_target wants them ("cpu",
# "CUDA"); BACKENDS uses jax.default_backend()-style names ("cpu", "cuda").
_REGISTRATIONS: dict = _ext.registrations()
BACKENDS: frozenset[str] = frozenset(p.lower() for p in _REGISTRATIONS)



def cuda_workspace_floats(m: int, k: int, n: int) -> int:
    """float32 workspace the CUDA kernel needs for an (m, k) x (k, n) product."""
    return int(_ext.cuda_workspace_floats(m, k, n))


def cuda_sparse_workspace_floats(m: int, k: int, n: int) -> int:
    """float32 workspace the CUDA 2:4 sparse kernel needs for an (m, k) x (k, n) product."""
    return int(_ext.cuda_sparse_workspace_floats(m, k, n))


_lock = threading.Lock()
_registered = False


def ensure_registered() -> None:
    """Register every handler of this build with JAX; later calls do nothing.

    Stateful handlers' types must be known before their handler, and a type
    registered before JAX starts its backends makes their start fail; so the
    backends are started first (this runs at the first trace of a call).
    """
    global _registered
    with _lock:
        if _registered:
            return
        jax.devices()
        for platform, types in _ext.types().items():
            for name, registration in types.items():
                jax.ffi.register_ffi_type(name, registration, platform=platform)
        for platform, targets in _REGISTRATIONS.items():
            for name, handler in targets.items():
                jax.ffi.register_ffi_target(name, handler, platform=platform)
        _registered = True

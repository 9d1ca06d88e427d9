"""quantize_params: turn a Flax model's Dense kernels into Marlin weights, one layer at a time.

The input is a param tree as Flax gives it: an NNX ``State`` (``nnx.state(model,
nnx.Param)``), a Linen params dict (or the whole ``{"params": ...}`` variables),
possibly with boxed (partitioned) leaves. A *Dense node* is a mapping with a
``"kernel"`` entry; each selected one becomes ``{"packed", "scales"[, "bias"]}``,
the parameters of ``QuantDense``, in the same kind of container and box as
the kernel (so logical axis names carry over). Everything else is returned as is.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import _dense, layout
from jax_marlin.gptq import gptq_quantize, hessian, sparsegpt_quantize
from jax_marlin.quantize import dequantize, quantize
from jax_marlin.quantized_weight import FLOAT_DTYPES, QuantizedWeight
from jax_marlin.sparse_quantize import quantize_sparse

__all__ = ["default_predicate", "quantize_params"]

Path = tuple


def default_predicate(path: str, kernel) -> bool:
    """Every 2-D kernel, except embeddings and the LM head (by name).

    ``path`` is the Dense's path ("layers/0/mlp/up"); a component containing
    "embed" or "lm_head" leaves the layer alone. Pass your own predicate to
    quantize those too, or stacked kernels of a scanned model:
    ``predicate=lambda path, kernel: kernel.ndim in (2, 3)`` (the leading axis
    is then the layer axis).
    """
    if kernel.ndim != 2:
        return False
    parts = path.lower().split("/")
    return not any("embed" in p or "lm_head" in p for p in parts)


# --- Tree helpers: containers and boxed leaves --------------------------------


def _path_str(path) -> str:
    return "/".join(str(k) for k in path) if isinstance(path, tuple) else str(path)


def _unbox(leaf):
    """The array inside an nnx.Variable / Linen box, or the leaf itself."""
    from flax import nnx
    from flax.core import meta

    if isinstance(leaf, nnx.Variable):
        return leaf.get_value()
    if isinstance(leaf, meta.AxisMetadata):
        return leaf.unbox()
    return leaf


def _axes(leaf):
    """(metadata key, logical axis names) of a boxed leaf, or (None, None)."""
    from flax import nnx

    if isinstance(leaf, nnx.Variable):
        from jax_marlin.nnx import sharding_of

        key, names = sharding_of(leaf.get_metadata())
        return (key, tuple(names)) if key is not None else (None, None)
    names = getattr(leaf, "names", None)
    return ("names", tuple(names)) if names else (None, None)


def _rebox(leaf, value, axes=None):
    """``value`` in the same kind of box as ``leaf``, with axis names ``axes`` if given."""
    from flax import nnx
    from flax.core import meta

    key, _ = _axes(leaf)
    if isinstance(leaf, nnx.Variable):
        updates = {key: axes} if (key is not None and axes is not None) else {}
        return leaf.copy(value, **updates)
    if isinstance(leaf, meta.AxisMetadata):
        if key is not None and axes is not None:
            return leaf.replace(value=value, names=axes)
        return leaf.replace_boxed(value)
    return value


def _rebuild_like(node: Mapping, children: dict):
    """A mapping of node's type (dict, FrozenDict, nnx.State) with ``children``."""
    if type(node) is dict:
        return children
    try:
        return type(node)(children)
    except Exception:  # an exotic mapping type: fall back to a plain dict
        return children


def _find_dense(tree, prefix: Path = ()):
    """[(path, node)] of every mapping with a "kernel" leaf, in tree order."""
    out = []
    if isinstance(tree, Mapping):
        if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
            out.append((prefix, tree))
        else:
            for k, v in tree.items():
                out.extend(_find_dense(v, prefix + (k,)))
    return out


def _replace_nodes(tree, new_nodes: dict, prefix: Path = ()):
    """tree with the nodes at the paths in ``new_nodes`` replaced (containers rebuilt)."""
    if prefix in new_nodes:
        return new_nodes[prefix]
    if isinstance(tree, Mapping) and any(p[: len(prefix)] == prefix for p in new_nodes):
        children = {k: _replace_nodes(v, new_nodes, prefix + (k,)) for k, v in tree.items()}
        return _rebuild_like(tree, children)
    return tree


# --- Per layer ------------------------------------------------------------------


def _per_slice(fn, kernel, x=None):
    """fn(w2d[, x]) -> (Sparse)QuantizedWeight for every (K, N) slice of a stacked kernel."""
    lead = kernel.shape[:-2]
    if not lead:
        return fn(kernel) if x is None else fn(kernel, x)
    qws = [fn(kernel[i]) if x is None else fn(kernel[i], x[i]) for i in np.ndindex(*lead)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a).reshape(*lead, *a[0].shape), *qws)


def _unsupported(K: int, N: int, group_size) -> str | None:
    """Why (K, N) cannot be quantized with group_size, or None."""
    if K % layout.TILE or N % layout.TILE:
        return f"(K, N) = ({K}, {N}) are not both multiples of {layout.TILE}"
    if group_size is not None and K % group_size:
        return f"group_size {group_size} does not divide K = {K}"
    return None


def _quantized_node(node: Mapping, qw, dtype) -> Mapping:
    """The QuantDense params for a Dense node: packed (or values, meta), scales (+ bias), same boxes."""
    kernel_leaf = node["kernel"]
    _, axes = _axes(kernel_leaf)
    children = {}
    for k, v in node.items():
        if k == "kernel":
            for name, leaf in _dense.weight_leaves(qw).items():
                names = _dense.scales_axes(axes, qw.is_per_channel) if name == "scales" else axes
                children[name] = _rebox(kernel_leaf, leaf, names)
        elif k == "bias":
            children["bias"] = _rebox(v, jnp.asarray(_unbox(v)).astype(dtype))
        else:
            children[k] = v
    return _rebuild_like(node, children)


def _fake_quant_node(node: Mapping, qw) -> Mapping:
    """The Dense node with its kernel replaced by the dequantized weight (sequential GPTQ)."""
    kernel_leaf = node["kernel"]
    w = dequantize(qw).astype(jnp.asarray(_unbox(kernel_leaf)).dtype)
    return _rebuild_like(node, {**dict(node), "kernel": _rebox(kernel_leaf, w)})


class _TextProgress:
    """Minimal progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0

    def set_postfix_str(self, s: str) -> None:
        sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} {s[:60]:<60}")
        sys.stderr.flush()

    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} done{' ' * 56}\n")
        sys.stderr.flush()


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return _TextProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="layer")


# --- The entry point ----------------------------------------------------------------


def quantize_params(
    params,
    group_size: int | None = 128,
    method: str = "rtn",
    calib: Mapping[Any, Any] | Callable[[Any], Mapping[Any, Any]] | None = None,
    predicate: Callable[[str, Any], bool] | None = None,
    *,
    dtype=jnp.float16,
    sequential: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    progress: bool = True,
    sparsity: str | None = None,
):
    """Quantize a Flax model's Dense kernels to 4-bit Marlin weights.

    Args:
      params: an NNX param State (``nnx.state(model, nnx.Param)``), a Linen
        params dict, or Linen variables ``{"params": ..., ...}`` (only
        "params" is touched; paths are relative to it).
      group_size: 32, 64, 128 or None (per-channel).
      method: "rtn" (round to nearest, exactly ``jax_marlin.quantize``) or
        "gptq" (needs ``calib``).
      calib: for GPTQ, the inputs of each Dense layer: a mapping {path:
        activations (..., K)} ("layers/0/attn/query" or a tuple of keys), or a
        callable ``calib(params) -> mapping`` such as
        ``jax_marlin.nnx.calibration(model, batches)`` /
        ``jax_marlin.linen.calibration(module, variables, batches)``.
        Stacked (scanned) kernels take activations with the same leading axes.
      predicate: ``predicate(path, kernel) -> bool`` picks the Dense layers
        to quantize; default ``default_predicate`` (2-D kernels, not
        embeddings or lm_head). A selected layer whose K or N is not a
        multiple of 64 (or whose K the group size does not divide) is left
        unquantized with a warning.
      dtype: scales' (and biases') dtype: float16 (default) or bfloat16; the
        QuantDense's param_dtype.
      sequential: with a callable ``calib``, capture again before each layer
        with the layers already quantized in place (their kernels replaced by
        the dequantized weights), as in the GPTQ paper; slower (one
        calibration pass per layer), usually more accurate.
      damp: GPTQ dampening (fraction of the Hessian's mean diagonal).
      block_size: GPTQ rows per lazy-update block.
      progress: show a progress bar over layers (tqdm if installed).
      sparsity: None (dense) or "2:4": prune each kernel to 2:4 along K and
        store it as a SparseQuantizedWeight (params ``values``, ``meta``,
        ``scales``; load into ``QuantDense(..., sparsity="2:4")``). With
        method "rtn" the mask is by magnitude (``quantize_sparse``); with
        "gptq" it is SparseGPT (``jax_marlin.gptq.sparsegpt_quantize``):
        Hessian-aware mask and error compensation.

    Returns:
      The same tree with each quantized Dense node's ``kernel`` replaced by
      ``packed`` and ``scales`` (and its ``bias`` cast to ``dtype``), in the
      container and box types of the input: load it into the model built with
      QuantDense in place of those Dense layers.
    """
    if sparsity not in _dense.SPARSITIES:
        raise ValueError(f'quantize_params: sparsity must be None or "2:4", got {sparsity!r}.')
    if method not in ("rtn", "gptq"):
        raise ValueError(f'quantize_params: method must be "rtn" or "gptq", got {method!r}.')
    if group_size is not None and group_size not in layout.GROUP_SIZES:
        raise ValueError(
            f"quantize_params: group_size must be one of {layout.GROUP_SIZES} or None "
            f"(per-channel), got {group_size!r}."
        )
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_params: dtype must be float16 or bfloat16, got {dtype}.")
    if method == "gptq" and calib is None:
        raise ValueError(
            'quantize_params(method="gptq") needs calib=: the inputs of each Dense layer '
            "({path: activations}) or a callable such as jax_marlin.nnx.calibration(model, "
            "batches) / jax_marlin.linen.calibration(module, variables, batches)."
        )
    if sequential and not callable(calib):
        raise ValueError("quantize_params(sequential=True) needs a callable calib (it captures again per layer).")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"quantize_params: params must be a Flax param tree (nnx.State or a dict), got "
            f"{type(params).__name__}; for NNX pass nnx.state(model, nnx.Param)."
        )

    # Linen variables: work inside "params", keep the other collections.
    if "params" in params and isinstance(params["params"], Mapping):
        others = {k: v for k, v in params.items() if k != "params"}
        if all(isinstance(v, Mapping) for v in others.values()):
            inner = quantize_params(
                params["params"], group_size, method, calib, predicate, dtype=dtype,
                sequential=sequential, damp=damp, block_size=block_size, progress=progress,
                sparsity=sparsity,
            )
            return _rebuild_like(params, {**dict(params), "params": inner})

    predicate = predicate or default_predicate
    todo = []
    for path, node in _find_dense(params):
        kernel = _unbox(node["kernel"])
        name = _path_str(path)
        if not hasattr(kernel, "ndim") or kernel.ndim < 2 or not predicate(name, kernel):
            continue
        K, N = kernel.shape[-2:]
        why = _unsupported(K, N, group_size)
        if why:
            warnings.warn(
                f"quantize_params: left {name!r} (kernel shape {tuple(kernel.shape)}) "
                f"unquantized: {why}. Keep it as a plain Dense in the quantized model.",
                stacklevel=2,
            )
            continue
        todo.append((path, node))

    activations = None
    if method == "gptq" and not sequential:
        activations = _normalize_calib(calib(params) if callable(calib) else calib)

    done: dict[Path, Mapping] = {}  # path -> quantized node
    fake: dict[Path, Mapping] = {}  # path -> dense node with dequantized kernel
    label = method if sparsity is None else f"{method}, {sparsity} sparse"
    bar = _progress_bar(len(todo), f"quantize_params ({label})", progress)
    try:
        for path, node in todo:
            name = _path_str(path)
            if bar is not None:
                bar.set_postfix_str(name)
            kernel = jnp.asarray(_unbox(node["kernel"]))
            if method == "rtn":
                rtn = quantize_sparse if sparsity == "2:4" else quantize
                qw = _per_slice(lambda w: rtn(w, group_size, dtype=dtype), kernel)
            else:
                if sequential:
                    current = _replace_nodes(params, fake)
                    x = _normalize_calib(calib(current)).get(name)
                else:
                    x = activations.get(name)
                if x is None:
                    raise KeyError(_missing_message(name, activations if not sequential else None))
                qw = _per_slice(
                    lambda w, xs: _gptq_layer(name, w, xs, group_size, dtype, damp, block_size,
                                              sparsity),
                    kernel,
                    jnp.asarray(x),
                )
                if sequential:
                    fake[path] = _fake_quant_node(node, qw)
            done[path] = _quantized_node(node, qw, dtype)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return _replace_nodes(params, done)


def _normalize_calib(calib) -> dict[str, Any]:
    if not isinstance(calib, Mapping):
        raise TypeError(
            f"quantize_params: calib must be a mapping {{path: activations}} (or a callable "
            f"returning one), got {type(calib).__name__}."
        )
    return {_path_str(k): v for k, v in calib.items()}


def _missing_message(name: str, activations) -> str:
    known = sorted(activations) if activations is not None else []
    shown = ", ".join(repr(k) for k in known[:8]) + (" ..." if len(known) > 8 else "")
    return (
        f"quantize_params(method='gptq'): calib has no activations for layer {name!r}"
        + (f" (it has {shown})" if known else "")
        + ". Capture that layer's inputs, or leave it out with predicate=."
    )


def _gptq_layer(name, w, x, group_size, dtype, damp, block_size, sparsity=None):
    K = w.shape[0]
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(
            f"quantize_params: calib activations for {name!r} have shape {tuple(x.shape)}, "
            f"but the layer has K = {K} inputs: they must be (..., {K})."
        )
    h = hessian(x)
    try:
        fn = sparsegpt_quantize if sparsity == "2:4" else gptq_quantize
        return fn(w, h, group_size, dtype=dtype, damp=damp, block_size=block_size)
    except ValueError as e:
        raise ValueError(f"quantize_params: layer {name!r}: {e}") from None

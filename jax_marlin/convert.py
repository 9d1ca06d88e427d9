"""Checkpoints: Hugging Face GPTQ -> Marlin repack (exact), and orbax save/restore.

Hugging Face GPTQ layout (AutoGPTQ / Optimum, ``bits=4, sym=True,
desc_act=False``) of a Linear with K inputs and N outputs, ``W`` (K, N):

  qweight  int32 (K // 8, N)       row r holds W's rows 8r..8r+7 of each column:
                                   row 8r + j in bits 4j..4j+3 (lowest nibble first)
  scales   float16 (K // g, N)     natural order (one row when group_size = -1)
  qzeros   int32 (K // g, N // 8)  zero points packed along N, same nibble order
  g_idx    int32 (K,)              group of each row: k // g when desc_act=False
  bias     float16 (N,)            optional

and ``W[k, n] = (q[k, n] - z) * scales[k // g, n]``. For sym checkpoints
z = 8; the original GPTQ format ("gptq", the default here, what Optimum and
AutoGPTQ save) stores ``z - 1 = 7`` in qzeros, the newer "gptq_v2" stores 8.
Marlin's code is ``value + 8`` with the same scale, so the 4-bit values copy
over unchanged: the repack is exact (``unpack(from_gptq(...))`` gives back q
and the scales bit for bit).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import layout
from jax_marlin.quantize import pack, unpack
from jax_marlin.quantized_weight import FLOAT_DTYPES, QuantizedWeight

__all__ = ["from_gptq", "load_gptq_safetensors", "restore", "save", "to_gptq"]

# Stored zero point of a sym 4-bit checkpoint per format (true zero point is 8).
_STORED_ZERO = {"gptq": 7, "gptq_v2": 8}
_SHIFTS = np.arange(8, dtype=np.uint32) * 4


def _nibbles(words: np.ndarray, axis: int) -> np.ndarray:
    """int32 words -> uint8 nibbles, 8 per word, lowest first, expanded along ``axis``."""
    u = words.astype(np.int32).view(np.uint32)
    v = (np.expand_dims(u, -1) >> _SHIFTS) & 0xF  # (..., 8)
    v = np.moveaxis(v, -1, axis + 1)  # the 8 nibbles right after the packed axis
    shape = list(words.shape)
    shape[axis] *= 8
    return v.reshape(shape).astype(np.uint8)


def _words(nibbles: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of _nibbles: uint8 values 0..15 -> int32 words packed along ``axis``."""
    v = np.moveaxis(nibbles.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // 8, 8)
    w = np.bitwise_or.reduce(v << _SHIFTS, axis=-1).astype(np.uint32)
    return np.moveaxis(w, -1, axis).view(np.int32)


def from_gptq(qweight, scales, qzeros=None, g_idx=None, *, checkpoint_format: str = "gptq") -> QuantizedWeight:
    """One HF GPTQ Linear (4-bit, sym, desc_act=False) -> QuantizedWeight, exactly.

    Args:
      qweight: int32 (K // 8, N).
      scales: float16/bfloat16 (K // g, N), g = 32, 64, 128 or K (group_size -1).
      qzeros: int32 (K // g, N // 8) or None; checked to be the sym zero point.
      g_idx: int32 (K,) or None; must be k // g (desc_act=False).
      checkpoint_format: "gptq" (stored zero 7, the usual) or "gptq_v2" (stored 8).
    """
    if checkpoint_format not in _STORED_ZERO:
        raise ValueError(f'checkpoint_format must be "gptq" or "gptq_v2", got {checkpoint_format!r}.')
    qweight = np.asarray(qweight)
    scales = np.asarray(scales)
    if qweight.dtype != np.int32 or qweight.ndim != 2:
        raise ValueError(
            f"from_gptq: qweight must be int32 (K // 8, N) (4-bit GPTQ), got "
            f"{qweight.dtype}{tuple(qweight.shape)}."
        )
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if scales.ndim != 2 or scales.shape[1] != N or scales.shape[0] == 0 or K % scales.shape[0]:
        raise ValueError(
            f"from_gptq: scales must be (K // group_size, N) = (?, {N}) with K = {K} "
            f"(from qweight {tuple(qweight.shape)}), got {tuple(scales.shape)}. Only 4-bit "
            f"checkpoints are supported (bits=4: qweight has K // 8 rows)."
        )
    if scales.dtype not in FLOAT_DTYPES:
        raise TypeError(f"from_gptq: scales must be float16 or bfloat16, got {scales.dtype}.")
    g = K // scales.shape[0]
    layout.check_shape(K, N, g)
    if g_idx is not None:
        g_idx = np.asarray(g_idx)
        if g_idx.shape != (K,) or not np.array_equal(g_idx, np.arange(K) // g):
            raise ValueError(
                "from_gptq: g_idx is not k // group_size: the checkpoint was made with "
                "desc_act=True (act-order), which the Marlin layout cannot hold without "
                "permuting the activations; use a desc_act=False checkpoint."
            )
    if qzeros is not None:
        qzeros = np.asarray(qzeros)
        if qzeros.shape != (K // g, N // 8):
            raise ValueError(
                f"from_gptq: qzeros must be (K // group_size, N // 8) = {(K // g, N // 8)}, "
                f"got {tuple(qzeros.shape)}."
            )
        zeros = _nibbles(qzeros, axis=1)
        want = _STORED_ZERO[checkpoint_format]
        if not np.all(zeros == want):
            found = np.unique(zeros)[:8].tolist()
            raise ValueError(
                f"from_gptq: qzeros hold {found}, not the symmetric zero point {want} of "
                f'checkpoint_format="{checkpoint_format}": only sym=True checkpoints '
                f"can be repacked exactly (try the other checkpoint_format if the values "
                f"are all {_STORED_ZERO['gptq_v2' if want == 7 else 'gptq']})."
            )
    codes = _nibbles(qweight, axis=0)
    return pack(jnp.asarray(codes), jnp.asarray(scales))


def to_gptq(qw: QuantizedWeight, *, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """QuantizedWeight -> HF GPTQ tensors {qweight, scales, qzeros, g_idx} (inverse of from_gptq)."""
    if checkpoint_format not in _STORED_ZERO:
        raise ValueError(f'checkpoint_format must be "gptq" or "gptq_v2", got {checkpoint_format!r}.')
    codes, scales = unpack(qw)
    codes, scales = np.asarray(codes), np.asarray(scales)
    K, N = codes.shape
    G = scales.shape[0]
    zeros = np.full((G, N), _STORED_ZERO[checkpoint_format], np.uint8)
    return {
        "qweight": _words(codes, axis=0),
        "scales": scales,
        "qzeros": _words(zeros, axis=1),
        "g_idx": (np.arange(K) // (K // G)).astype(np.int32),
    }


def load_gptq_safetensors(paths, *, checkpoint_format: str = "gptq", progress: bool = False) -> dict:
    """Read HF GPTQ safetensors file(s) and repack every quantized Linear.

    Args:
      paths: a file, a directory (all ``*.safetensors`` in it) or a list of files.
      checkpoint_format: see ``from_gptq``.

    Returns:
      A nested dict following the tensors' dotted names: each quantized
      module ("model.layers.0.self_attn.q_proj") becomes
      ``{"packed", "scales"[, "bias"]}`` (QuantDense's parameters); other
      tensors (embeddings, norms) are numpy arrays under their names. Map it
      onto your Flax model's tree (e.g. rename keys, transpose dense kernels
      from torch's (N, K)). Modules are converted one at a time.
    """
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(
            "load_gptq_safetensors needs the safetensors package: pip install safetensors "
            "(or pip install 'jax_marlin[examples]')."
        ) from None
    if isinstance(paths, (str, os.PathLike)):
        p = os.fspath(paths)
        paths = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors")) if os.path.isdir(p) else [p]
    handles = [safe_open(os.fspath(p), framework="np") for p in paths]
    where = {name: h for h in handles for name in h.keys()}
    modules = sorted(n[: -len(".qweight")] for n in where if n.endswith(".qweight"))
    used: set = set()
    out: dict = {}
    for m in _maybe_progress(modules, progress):
        def get(suffix, m=m):
            name = f"{m}.{suffix}"
            if name not in where:
                return None
            used.add(name)
            return where[name].get_tensor(name)

        try:
            qw = from_gptq(get("qweight"), get("scales"), get("qzeros"), get("g_idx"), checkpoint_format=checkpoint_format)
        except (ValueError, TypeError) as e:
            raise type(e)(f"load_gptq_safetensors: module {m!r}: {e}") from None
        node = {"packed": qw.packed, "scales": qw.scales}
        bias = get("bias")
        if bias is not None:
            node["bias"] = jnp.asarray(bias)
        _set(out, m.split("."), node)
    for name, h in where.items():
        if name not in used:
            _set(out, name.split("."), h.get_tensor(name))
    return out


def _set(tree: dict, keys, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _maybe_progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="repack", unit="layer")


# --- orbax ---------------------------------------------------------------------------


def save(path, tree, *, force: bool = False) -> None:
    """Save a quantized param tree (NNX State, Linen dict, QuantizedWeights) with orbax.

    ``path`` must not exist unless ``force``; it is made absolute (orbax needs that).
    """
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.fspath(path)), tree, force=force)
        ckptr.wait_until_finished()


def restore(path, target=None):
    """Restore a tree saved by ``save``.

    ``target``: the tree's structure: an abstract one is enough, e.g.
    ``nnx.state(nnx.eval_shape(lambda: Model(...)), nnx.Param)`` or
    ``jax.eval_shape(model.init, ...)["params"]``; it restores the containers,
    dtypes and shardings. Without it you get nested dicts of arrays.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if target is not None:
        target = jax.tree.map(_abstract, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target) if target is not None else ckptr.restore(path)


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "shape"):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

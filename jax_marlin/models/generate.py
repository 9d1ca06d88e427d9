"""Text generation for ``llama.Llama``: a compiled prefill and a compiled decode loop.

    gen = Generator(model, max_len=256)                 # or mesh=... for tensor parallelism
    out = gen.generate([[1, 5, 9], [1, 7]], max_new_tokens=32,
                       sampling=Sampling(temperature=0.8, top_k=40, top_p=0.95),
                       stop_tokens=(2,), seed=0)
    out.tokens, out.lengths, out.decode_tokens_per_s

Two jitted programs, each compiled once per shape and setting (never per token):

- ``prefill``: the left-padded prompts (B, P) in one forward pass, writing
  the KV cache's slots 0..P-1; returns the last position's logits.
- ``decode``: a ``lax.while_loop`` whose carry is the KV cache, the last
  token, the output buffer and each row's done flag. One step runs the model
  on one token per row at cache slot P + i - 1 and samples the next. It stops
  when every row has emitted a stop token or after ``max_new_tokens``.

The cache is donated to both (updated in place). Prompt lengths are padded
up to a multiple of ``pad_multiple`` so that a few prefill programs serve all
lengths; the decode program depends only on the batch, the cache length, the number
of new tokens and the sampling settings (static: a new setting compiles a new
program); prompts, seeds and stop tokens are inputs.

``TRACES`` counts how often each program was traced (= compiled), for tests.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_marlin.models.llama import (MODEL_RULES, cache_shardings, check_tensor_parallel,
                                     init_cache, param_shardings)

__all__ = ["Generator", "GenerationResult", "Sampling", "TRACES", "pad_prompts", "sample"]

TRACES: collections.Counter = collections.Counter()


# --- Sampling --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Otherwise sample from softmax(logits / temperature)
    restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set
    whose probability reaches ``top_p`` (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}.")


def sample(logits, key, sampling: Sampling):
    """Next tokens (B,) int32 from logits (B, V) float32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    neg = jnp.finfo(logits.dtype).min
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        # Keep the most likely tokens until their probability reaches top_p
        # (the first always): drop those whose preceding mass already does.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < sampling.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- Prompts ---------------------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 16):
    """Left-pad token lists to one length (rounded up to ``multiple``).

    Returns (tokens int32 (B, P), pad int32 (B,)): row b's prompt fills
    tokens[b, pad[b]:]. Left padding puts every prompt's last token at slot
    P - 1, so one decode position serves the whole batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts: need at least one prompt, each with at least one token.")
    longest = max(len(p) for p in prompts)
    P_ = -(-longest // multiple) * multiple
    tokens = np.full((len(prompts), P_), pad_id, np.int32)
    pad = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, P_ - len(p):] = np.asarray(p, np.int32)
        pad[b] = P_ - len(p)
    return tokens, pad


def stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop token ids as int32 padded with -1 to a multiple of 8: the decode program
    takes them as an input, so other stop tokens (up to 8, 16, ...) reuse it."""
    ids = [int(t) for t in stop_tokens]
    if any(t < 0 for t in ids):
        raise ValueError(f"stop_tokens must be token ids (>= 0), got {ids}.")
    n = max(8, -(-len(ids) // 8) * 8)
    return jnp.asarray(ids + [-1] * (n - len(ids)), jnp.int32)


# --- The compiled programs -----------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, pad, cache):
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache, 0, pad, all_logits=False)
    return logits[:, 0], cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "steps", "sampling", "return_logits"),
    donate_argnames=("cache",),
)
def _decode(graphdef, state, cache, logits0, index0, pad, key, stops, fill_id, *, steps,
            sampling, return_logits):
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    B, V = logits0.shape

    def is_stop(tok):
        return jnp.any(tok[:, None] == stops[None, :], axis=-1)

    tok0 = sample(logits0, jax.random.fold_in(key, 0), sampling)
    out = jnp.full((B, steps), fill_id, jnp.int32).at[:, 0].set(tok0)
    logits_buf = (jnp.zeros((B, steps, V), jnp.float32).at[:, 0].set(logits0)
                  if return_logits else None)
    done = is_stop(tok0)
    lengths = jnp.ones((B,), jnp.int32)

    def cond(c):
        i, _, _, done, *_ = c
        return (i < steps) & ~jnp.all(done)

    def body(c):
        i, tok, cache, done, out, lengths, logits_buf = c
        # The previous token goes into cache slot index0 + i - 1.
        logits, cache = model(tok[:, None], cache, index0 + i - 1, pad, all_logits=True)
        logits = logits[:, 0]
        nxt = sample(logits, jax.random.fold_in(key, i), sampling)
        nxt = jnp.where(done, fill_id, nxt)  # finished rows only pad
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        if logits_buf is not None:
            logits_buf = jax.lax.dynamic_update_slice(logits_buf, logits[:, None], (0, i, 0))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(nxt)
        return i + 1, nxt, cache, done, out, lengths, logits_buf

    carry = (jnp.int32(1), tok0, cache, done, out, lengths, logits_buf)
    i, _, cache, _, out, lengths, logits_buf = jax.lax.while_loop(cond, body, carry)
    return out, lengths, logits_buf, i - 1, cache


# --- The driver ---------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # (B, max_new_tokens) int32; ``fill_id`` after a row's stop token
    lengths: np.ndarray  # (B,) tokens generated per row, the stop token included
    logits: np.ndarray | None  # (B, max_new_tokens, V) float32 when return_logits
    prefill_s: float  # wall time of the prefill (incl. compilation on first call)
    decode_s: float  # wall time of the decode loop
    decode_steps: int  # forward passes the decode loop ran (one token per row each)

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second in decode, all rows counted (batch x steps / time)."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s else float("nan")

    def sequences(self) -> list[list[int]]:
        """Each row's generated tokens, up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


class Generator:
    """Compiled generation for one model and KV-cache length.

    Args:
      model: a ``llama.Llama`` (int4 or 16-bit projections).
      max_len: KV-cache slots: the padded prompt plus the new tokens must fit.
      mesh: optional ``jax.sharding.Mesh`` with axes "data" and/or "model":
        parameters are split by their logical axes under ``rules`` (tensor
        parallel over "model", see ``llama.MODEL_RULES``), the batch over
        "data". Compiled with plain ``jax.jit``: marlin_matmul's partitioning
        rules run each device's weight shard without gathering it.
      cache_dtype: KV cache dtype (default: the model's).
      pad_multiple: prompt lengths are padded up to a multiple of this.
    """

    def __init__(self, model, *, max_len: int, mesh=None, rules=MODEL_RULES,
                 cache_dtype=None, pad_multiple: int = 16):
        self.cfg = model.cfg
        self.max_len = max_len
        self.mesh = mesh
        self.pad_multiple = pad_multiple
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        self.graphdef, state = nnx.split(model)
        self._cache_shardings = None
        if mesh is not None:
            # A split that cuts heads or gate/up chunk pairs would still compute
            # the right thing under jit, through collectives on every layer:
            # refuse it instead, saying what fits.
            tp_axis = dict(rules).get("kv_heads")
            down = model.layers[0].mlp.down_proj
            check_tensor_parallel(self.cfg, mesh.shape.get(tp_axis, 1),
                                  getattr(down, "group_size", None))
            state = jax.device_put(state, param_shardings(state, mesh, rules))
            self._cache_shardings = cache_shardings(self.cfg, mesh, rules)
        self.state = state

    def _put_batch(self, a):
        if self.mesh is None:
            return jnp.asarray(a)
        data = "data" if "data" in self.mesh.shape else None
        if data and a.shape[0] % self.mesh.shape[data]:
            raise ValueError(f"Generator: batch {a.shape[0]} is not a multiple of the mesh's "
                             f"'data' axis ({self.mesh.shape[data]}); pad the batch or use a "
                             f"smaller data axis.")
        return jax.device_put(a, NamedSharding(self.mesh, P(data)))

    def generate(self, prompts, max_new_tokens: int, *, sampling: Sampling = Sampling(),
                 stop_tokens: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
                 fill_id: int | None = None, return_logits: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens for each prompt.

        Args:
          prompts: a list of token lists (left-padded here), or ``(tokens, pad)``
            from ``pad_prompts``.
          sampling: ``Sampling`` (default greedy).
          stop_tokens: a row stops after emitting one of these; the loop ends
            when all rows have stopped.
          seed: random seed (same seed, same prompts: same tokens).
          pad_id: token id used for padding prompts.
          fill_id: written after a row's stop token (default ``pad_id``).
          return_logits: also return the logits each token was sampled from.
        """
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
        tokens, pad = (prompts if isinstance(prompts, tuple)
                       else pad_prompts(prompts, pad_id, self.pad_multiple))
        B, P_ = tokens.shape
        if P_ + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"generate: the padded prompt ({P_} slots) plus {max_new_tokens} new tokens "
                f"need {P_ + max_new_tokens - 1} cache slots, but the Generator has "
                f"max_len={self.max_len}; make a Generator with a larger max_len or ask for "
                f"fewer tokens.")
        tokens, pad = self._put_batch(np.asarray(tokens, np.int32)), self._put_batch(np.asarray(pad, np.int32))
        cache = init_cache(self.cfg, B, self.max_len, self.cache_dtype, self._cache_shardings)

        t0 = time.perf_counter()
        logits0, cache = _prefill(self.graphdef, self.state, tokens, pad, cache)
        jax.block_until_ready(logits0)
        t1 = time.perf_counter()
        out, lengths, logits, steps, cache = _decode(
            self.graphdef, self.state, cache, logits0, jnp.int32(P_), pad, jax.random.key(seed),
            stop_array(stop_tokens), jnp.int32(pad_id if fill_id is None else fill_id),
            steps=max_new_tokens, sampling=sampling, return_logits=return_logits)
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        del cache
        return GenerationResult(
            tokens=np.asarray(out), lengths=np.asarray(lengths),
            logits=None if logits is None else np.asarray(logits),
            prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=int(steps))

    def logits(self, tokens, pad=None):
        """Logits (B, T, V) of a whole sequence in one pass (no cache reuse): the reference
        that cached decoding must match, and teacher-forced comparisons of two models."""
        tokens = np.asarray(tokens, np.int32)
        pad = np.zeros((tokens.shape[0],), np.int32) if pad is None else np.asarray(pad, np.int32)
        cache = init_cache(self.cfg, tokens.shape[0], tokens.shape[1], self.cache_dtype,
                           self._cache_shardings)
        return np.asarray(_forward(self.graphdef, self.state, self._put_batch(tokens),
                                   self._put_batch(pad), cache))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, tokens, pad, cache):
    TRACES["forward"] += 1
    model = nnx.merge(graphdef, state)
    return model(tokens, cache, 0, pad, all_logits=True)[0]


def compare_greedy(ref: GenerationResult, other: GenerationResult, rtol: float = 2e-2) -> dict:
    """Whether two greedy generations of the same prompts agree up to float rounding.

    Two computations of the same model that differ only in the order of
    float sums (another kernel, a sharded run whose partial sums are added in
    16 bits) give logits that differ in the last bits, which can flip an
    argmax where the top two logits nearly tie; after that the sequences
    differ legitimately. So: row by row, the tokens must be equal, or equal
    up to a step where the two chosen tokens' logits were within ``tol``
    (``rtol`` x the largest |logit|), and until that step (inclusive, the
    inputs being the same) the logits must be within ``tol``. Both results
    need ``return_logits=True``.

    Returns a dict: ok, rows_equal, first_difference (per row, None if
    equal), max_logit_diff (over the steps compared), tol.
    """
    if ref.logits is None or other.logits is None:
        raise ValueError("compare_greedy: generate both with return_logits=True.")
    tol = rtol * float(np.abs(ref.logits).max())
    ok, firsts, worst = True, [], 0.0
    for b in range(ref.batch):
        n = min(ref.lengths[b], other.lengths[b])
        diff = np.nonzero(ref.tokens[b, :n] != other.tokens[b, :n])[0]
        d = int(diff[0]) if diff.size else None
        upto = n if d is None else d + 1
        worst = max(worst, float(np.abs(ref.logits[b, :upto] - other.logits[b, :upto]).max()))
        if d is None:
            ok &= bool(ref.lengths[b] == other.lengths[b])
        else:
            a_tok, o_tok = ref.tokens[b, d], other.tokens[b, d]
            gap = abs(float(ref.logits[b, d, a_tok] - ref.logits[b, d, o_tok]))
            ok &= gap <= tol
        firsts.append(d)
    ok &= worst <= tol
    return dict(ok=bool(ok), rows_equal=sum(f is None for f in firsts), first_difference=firsts,
                max_logit_diff=worst, tol=tol)

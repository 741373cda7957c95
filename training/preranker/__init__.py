"""The pre-ranker: light and expressive models trained from point-in-time joins.

``data`` turns a joined training set into tensors (preprocessing fitted on training rows only),
``models`` holds the two networks, ``losses`` every objective (exposed-only, negative sampling,
distillation, GPL dual-label fusion, HAP per-group contrastive), ``train`` the loop,
``routing`` the difficulty-aware cascade and ``job`` the stage that ties them to a run directory.
"""

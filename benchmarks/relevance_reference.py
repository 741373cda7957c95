"""A relevance that knows the synthetic generator: how far the pseudo-labels' truth AUC can go.

The synthetic catalog's users pick a topic by their (drifting) interest weights, then an item of
that topic by its popularity (``training/data/synthetic.py``), and the simulator's truth is
"among the user's next 20 engagements". So a score built from the generator's own structure,

    p(item | user) = share of the item's topic among the user's positives before the request
                     (add-``alpha`` smoothed)
                   x the item's share of its topic's positives before the benchmark's split,
    score = 1 - (1 - p) ^ 20,

approaches the best AUC any relevance can reach on these rows. It reads the item's ``category``
(the topic), which no stage of the product sees, so it is a reference, not a method. Every
figure is an AUC against the truth on the job's labelled unexposed rows (the rows of
``auc_gpl_relevance`` in the benchmark's JSON), beside the job's own relevance on them. It reads
the artifacts that ``benchmarks/pseudo_labels.py --datasets synthetic --work DIR`` keeps:

    .venv/bin/python benchmarks/relevance_reference.py DIR/synthetic [--out FILE]

Writes ``benchmarks/results/relevance_reference.json`` by default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pseudo_labels import (
    labelled_rows_with_truth,
    load_dataset,
    parse_work_folders,
    report_row_aucs,
)

from training.evaluation.metrics import auc

HORIZON = 20
"""The simulator's ``future_horizon``: the truth is an engagement among the next 20."""
TOPIC_SMOOTHING = (0.1, 0.5, 2.0)
"""Add-alpha smoothing of the user's topic counts (a user's interests are 2-4 of 12 topics)."""
POPULARITY_SMOOTHING = 0.5
"""Added to every item's count of positives before the split."""


def figures(work: Path, ml100k: Path) -> dict[str, float]:
    """The reference's AUCs on one work folder (see the module docstring)."""
    rows = labelled_rows_with_truth(work / "pseudo_labels" / "pseudo_labels.parquet", work)
    data = load_dataset("synthetic", ml100k)
    items = data.items.to_pandas()
    interactions = data.interactions.to_pandas().sort_values(["user_id", "event_timestamp"])
    # The benchmark's split: its evaluation requests are those at or after it.
    split = pc.min(pq.read_table(work / "eval_requests.parquet").column("event_timestamp"))
    before = interactions[interactions["event_timestamp"] < pd.Timestamp(split.as_py())]
    topics, topic_of = np.unique(items["category"].to_numpy(), return_inverse=True)
    topic = pd.Series(topic_of, index=items["item_id"])
    count = before["item_id"].value_counts().reindex(items["item_id"]).fillna(0).to_numpy()
    count = count + POPULARITY_SMOOTHING
    share_in_topic = pd.Series(
        count / np.bincount(topic_of, weights=count)[topic_of], index=items["item_id"]
    )

    y = rows["truth"].to_numpy()
    row_topic = topic.loc[rows["item_id"]].to_numpy()
    row_share = share_in_topic.loc[rows["item_id"]].to_numpy()
    by_user = {u: g for u, g in interactions.groupby("user_id", sort=False)}
    counts = np.zeros((len(rows), len(topics)))
    groups = rows.groupby(["user_id", "event_timestamp"], sort=False).indices
    for (user, ts), idx in groups.items():
        history = by_user[user]
        seen = history.loc[history["event_timestamp"] < ts, "item_id"]
        counts[idx] = np.bincount(topic.loc[seen].to_numpy(), minlength=len(topics))
    result = {"rows": float(len(rows)), "auc_job_relevance": auc(y, rows["relevance"].to_numpy())}
    for alpha in TOPIC_SMOOTHING:
        smoothed = counts + alpha
        topic_share = (smoothed / smoothed.sum(1, keepdims=True))[np.arange(len(rows)), row_topic]
        result[f"auc_topic_share_alpha_{alpha}"] = auc(y, topic_share)
        p = topic_share * row_share
        result[f"auc_topic_share_x_item_share_alpha_{alpha}"] = auc(y, 1 - (1 - p) ** HORIZON)
    return result


def main() -> None:
    args = parse_work_folders(__doc__ or "", "relevance_reference.json")
    results = {str(work): figures(work, args.ml100k) for work in args.work}
    report_row_aucs("relevance_reference", results, args.out)


if __name__ == "__main__":
    main()

"""What GPL's relevance adds once an item's base rate is in the calibration (diagnostic).

GPL's pseudo-label is relevance (max cosine to the anchors) calibrated on exposed clicks by a
one-feature logistic regression, which cannot change the order of the candidates. Relevance is
a semantic match and knows nothing of how often an item is engaged with at all, which the
simulator's truth (the user's next engagements) depends on. This script asks what a calibration
with the item's base rate would do, and compares it fairly: each score below is a small logistic
regression fitted on the **same exposed rows with their clicks** (the rows the job calibrates
on) and scored against the truth on the job's labelled unexposed rows:

* ``relevance`` (GPL as the job ships it: one feature, so the order is relevance's own),
* ``history`` (the distillation teacher's content feature: cosine of the candidate to the mean of
  the user's last 50 positives before the request), ``popularity`` (log of 1 + the item's
  positives before the first scored request: the time split, so nothing of the scored period),
* and their combinations. ``relevance + popularity`` against ``history + popularity`` is GPL
  against a distillation teacher of the same size and the same base rate.

It reads the artifacts that ``benchmarks/pseudo_labels.py --work DIR`` keeps, and scores the
exposed rows of the evaluation requests with the job itself (the same anchors, kernel and
point-in-time rules as the unexposed rows):

    .venv/bin/python benchmarks/pseudo_labels.py --lm-epochs 10 --sid-epochs 20 --work DIR
    .venv/bin/python benchmarks/calibration_priors.py DIR/ml-100k DIR/synthetic --out FILE

Writes ``benchmarks/results/calibration_priors.json`` by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Run as a script, this folder is on the path: the benchmark whose artifacts are read here
# also defines the teacher's history feature, which must be the same function.
from pseudo_labels import (
    history_similarity,
    load_dataset,
    parse_work_folders,
    print_by_folder,
    write_diagnostic,
)

from training.data.dataset import LoadedDataset
from training.evaluation.metrics import auc
from training.pseudo_labels.job import PseudoLabelConfig, generate_pseudo_labels

EXPOSED = ("exposed_negative", "exposed_positive")
UNEXPOSED = ("prerank_negative", "rank_negative")
COMBINATIONS: dict[str, tuple[str, ...]] = {
    "relevance (GPL)": ("relevance",),
    "history": ("history",),
    "popularity": ("popularity",),
    "relevance + popularity": ("relevance", "popularity"),
    "history + popularity (teacher of the same size)": ("history", "popularity"),
    "relevance + history": ("relevance", "history"),
    "relevance + history + popularity": ("relevance", "history", "popularity"),
}


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], l2: float = 1e-4, steps: int = 50
) -> npt.NDArray[np.float64]:
    """Weights (bias first) of an L2-regularized logistic regression, by Newton's method.

    Features are standardized inside; the weights returned apply to the raw features.
    """
    mean, std = x.mean(0), x.std(0) + 1e-12
    z = np.c_[np.ones(len(x)), (x - mean) / std]
    w = np.zeros(z.shape[1])
    penalty = l2 * len(x) * np.diag([0.0, *([1.0] * x.shape[1])])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + penalty @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    raw = w[1:] / std
    return np.r_[w[0] - raw @ mean, raw]


def scored_rows(work: Path, data: LoadedDataset) -> pd.DataFrame:
    """Exposed and unexposed rows of the evaluation requests with relevance, truth and features.

    The job labels only unexposed candidates, so the exposed rows are handed to it as rank
    negatives without labels (calibration off): their relevance comes from the same anchor sets
    and kernel. Their clicks and groups are taken back from the log afterwards.
    """
    log = pq.read_table(work / "eval_requests.parquet")
    exposed = pc.is_in(log.column("group"), pa.array(EXPOSED))
    disguised = log
    for column, value in (("group", "rank_negative"), ("stage", "ranked")):
        i = disguised.schema.get_field_index(column)
        disguised = disguised.set_column(
            i, column, pc.if_else(exposed, value, disguised.column(column))
        )
    i = disguised.schema.get_field_index("label")
    disguised = disguised.set_column(
        i, "label", pc.if_else(exposed, pa.scalar(None, pa.int8()), disguised.column("label"))
    )
    semantics = pq.read_table(work / "sids" / "item_semantics.parquet")
    anchors = pq.read_table(work / "anchors" / "user_interest_anchors.parquet")
    result = generate_pseudo_labels(
        disguised,
        semantics,
        anchors,
        data.interactions,
        PseudoLabelConfig(progress=False, calibration="none"),
        work / "pseudo_labels_all_rows",
    )
    rows = pq.read_table(result.path).to_pandas()
    rows = rows[rows["status"] == "ok"][
        ["request_id", "user_id", "item_id", "event_timestamp", "relevance"]
    ]
    keys = ["request_id", "item_id"]
    groups = log.select([*keys, "group", "label"]).to_pandas()
    truth = pq.read_table(work / "truth.parquet").to_pandas()[[*keys, "label"]]
    rows = rows.merge(groups, on=keys, validate="one_to_one").merge(
        truth.rename(columns={"label": "truth"}), on=keys, validate="one_to_one"
    )
    inter = data.interactions.select(["user_id", "item_id", "event_timestamp"]).to_pandas()
    split = rows["event_timestamp"].min()
    counts = inter[inter["event_timestamp"] < split]["item_id"].value_counts()
    rows["popularity"] = np.log1p(rows["item_id"].map(counts).fillna(0).to_numpy())
    vectors = np.stack(semantics.column("content_embedding").to_numpy(zero_copy_only=False))
    emb = dict(zip(semantics.column("item_id").to_pylist(), vectors, strict=True))
    rows["history"] = history_similarity(rows, inter, emb, 50)
    return rows


def evaluate(rows: pd.DataFrame) -> dict[str, Any]:
    """AUC on unexposed truth of each combination fitted on the exposed rows' clicks."""
    fit = rows["group"].isin(EXPOSED).to_numpy()
    score = rows["group"].isin(UNEXPOSED).to_numpy()
    y_fit = rows.loc[fit, "label"].to_numpy(np.float64)
    y = rows.loc[score, "truth"].to_numpy()
    out: dict[str, Any] = {
        "exposed_rows": int(fit.sum()),
        "exposed_clicks": int(y_fit.sum()),
        "unexposed_rows": int(score.sum()),
    }
    for name, features in COMBINATIONS.items():
        x = rows[list(features)].to_numpy(np.float64)
        w = fit_logistic(x[fit], y_fit)
        out[name] = {
            "auc": auc(y, x[score] @ w[1:]),
            "weights": dict(zip(["bias", *features], np.round(w, 4).tolist(), strict=True)),
        }
    return out


def main() -> None:
    args = parse_work_folders(__doc__ or "", "calibration_priors.json")
    results: dict[str, dict[str, Any]] = {}
    for work in args.work:
        rows = scored_rows(work, load_dataset(work.name, args.ml100k))
        results[str(work)] = evaluate(rows)
    print_by_folder(
        "AUC on unexposed truth; each score fitted on the same exposed rows' clicks",
        f"{'score':<50}",
        {name: [r[name]["auc"] for r in results.values()] for name in COMBINATIONS},
        list(results),
        ".4f",
    )
    write_diagnostic("calibration_priors", results, args.out)


if __name__ == "__main__":
    main()

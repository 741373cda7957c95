"""Which confidence weights select the pseudo-labels that agree with the truth?

Reads the labelled evaluation rows that ``benchmarks/pseudo_labels.py --save-rows DIR`` writes
(one parquet per dataset and seed: truth, pseudo_label and the three confidence factors) and, for
each weighting of the factors (weighted geometric mean, as the job combines them), reports the
AUC of the pseudo-labels against the truth on the top and bottom confidence halves (ties broken at
random, so each half is exactly half) and over all rows. A useful confidence puts the rows whose
pseudo-labels rank the truth well in its top half: "lift" = top-half AUC - all-rows AUC.

    .venv/bin/python benchmarks/pseudo_labels.py --seed S --save-rows runs/confidence_rows
    .venv/bin/python benchmarks/confidence_weights.py runs/confidence_rows
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from training.evaluation.metrics import auc, upper_half
from training.pseudo_labels.confidence import combine

FACTORS = ("dispersion", "history_consistency", "lm_confidence")
WEIGHTS = [
    (1.0, 1.0, 1.0),
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (2.0, 1.0, 1.0),
    (4.0, 1.0, 1.0),
    (2.0, 1.0, 0.0),
]
"""(dispersion, history, lm) weightings compared; the first is the paper's equal combination."""


def halves(rows: pd.DataFrame, weights: tuple[float, ...], seed: int = 0) -> dict[str, float]:
    """All-rows, top-half and bottom-half AUC of the pseudo-labels under one weighting."""
    y = rows["truth"].to_numpy()
    label = rows["pseudo_label"].to_numpy()
    confidence = combine([rows[f].to_numpy() for f in FACTORS], list(weights), "geometric")
    top = upper_half(confidence, seed)
    every = auc(y, label)
    upper = auc(y[top], label[top])
    return {
        "all": every,
        "top_half": upper,
        "bottom_half": auc(y[~top], label[~top]),
        "lift": upper - every,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rows", type=Path, help="directory of --save-rows parquet files")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "confidence_weights.json",
    )
    args = parser.parse_args()
    files = sorted(args.rows.glob("*.parquet"))
    if not files:
        raise SystemExit(f"{args.rows}: no parquet files (run pseudo_labels.py --save-rows)")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for file in files:
        rows = pd.read_parquet(file, columns=["truth", "pseudo_label", *FACTORS])
        results[file.stem] = {
            ",".join(f"{w:g}" for w in weights): halves(rows, weights) for weights in WEIGHTS
        }
    names = list(results)
    print("\nTop-confidence-half AUC minus all-rows AUC, per weighting (dispersion,history,lm)")
    print(f"{'weights':<12}" + "".join(f"{n:>22}" for n in names))
    for key in results[names[0]]:
        print(f"{key:<12}" + "".join(f"{results[n][key]['lift']:>+22.4f}" for n in names))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"factors": FACTORS, "results": results}, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

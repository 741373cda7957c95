"""Which confidence puts the better pseudo-labels in its top half, per historical-consistency form.

The pseudo-label target asks confidence weighting to raise the AUC of the top-confidence half.
This script re-runs the pseudo-label job on the artifacts that ``benchmarks/pseudo_labels.py
--work DIR`` keeps (the same anchors, rows and calibration), once per historical-consistency form
(``history_form``: ``coverage``, the set's coverage of the user's history, and ``matched``, the
matched anchor's agreement with it), and reports for each confidence (every factor alone, and
the combinations below) the AUC of relevance against the simulator's truth in the top- and
bottom-confidence halves minus the AUC over all rows. Halves are exact (ties at the median
broken at random with seed 0, as the benchmark does with its own seed).

    .venv/bin/python benchmarks/pseudo_labels.py --lm-epochs 10 --sid-epochs 20 --seed S --work DIR
    .venv/bin/python benchmarks/confidence_forms.py DIR/ml-100k DIR/synthetic ... --out FILE

With ``--as-run`` it re-runs nothing: it reads the pseudo-labels the benchmark itself wrote
(``DIR/pseudo_labels``, with whatever relevance and form it ran: ``--relevance lm_likelihood``
needs the anchor LM, which this script does not load) and reports the same confidences on them,
under the form the manifest names.

Writes ``benchmarks/results/confidence_forms.json`` by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq

# Run as a script, this folder is on the path: the benchmark whose artifacts are read here.
from pseudo_labels import (
    labelled_rows_with_truth,
    load_dataset,
    parse_work_folders,
    print_by_folder,
    write_diagnostic,
)

from training.data.dataset import LoadedDataset
from training.evaluation.metrics import auc, upper_half
from training.io import read_manifest
from training.pseudo_labels.confidence import HistoryForm, combine
from training.pseudo_labels.job import PseudoLabelConfig, generate_pseudo_labels

FORMS: tuple[HistoryForm, ...] = ("coverage", "matched")
WEIGHTS: dict[str, tuple[float, float, float]] = {
    "dispersion alone": (1, 0, 0),
    "history alone": (0, 1, 0),
    "lm alone": (0, 0, 1),
    "dispersion + history": (1, 1, 0),
    "equal (1, 1, 1)": (1, 1, 1),
}
"""Confidences compared: weights of (dispersion, history, lm) in the job's geometric mean."""


def lifts(work: Path, data: LoadedDataset, form: HistoryForm) -> dict[str, Any]:
    """Top- and bottom-half AUC minus all rows' AUC for each confidence, one form."""
    result = generate_pseudo_labels(
        pq.read_table(work / "eval_requests.parquet"),
        pq.read_table(work / "sids" / "item_semantics.parquet"),
        pq.read_table(work / "anchors" / "user_interest_anchors.parquet"),
        data.interactions,
        PseudoLabelConfig(progress=False, history_form=form),
        work / f"pseudo_labels_{form}",
    )
    return lifts_of(result.path, work)


def lifts_of(labels: Path, work: Path) -> dict[str, Any]:
    """:func:`lifts` on pseudo-labels already written (``labels``, a pseudo_labels.parquet)."""
    rows = labelled_rows_with_truth(labels, work)
    y = rows["truth"].to_numpy()
    relevance = rows["relevance"].to_numpy()
    everything = auc(y, relevance)
    factors: list[npt.NDArray[np.float32]] = [
        rows[c].to_numpy(np.float32) for c in ("dispersion", "history_consistency", "lm_confidence")
    ]
    out: dict[str, Any] = {"rows": len(rows), "auc_all": everything}
    for name, weights in WEIGHTS.items():
        confidence = combine(factors, list(weights))
        top = upper_half(confidence, 0)
        out[name] = {
            "top_minus_all": auc(y[top], relevance[top]) - everything,
            "bottom_minus_all": auc(y[~top], relevance[~top]) - everything,
        }
    return out


def main() -> None:
    args = parse_work_folders(
        __doc__ or "",
        "confidence_forms.json",
        lambda parser: parser.add_argument(
            "--as-run",
            action="store_true",
            help="read the benchmark's own DIR/pseudo_labels instead of re-running the job",
        ),
    )
    results: dict[str, dict[str, Any]] = {}
    for work in args.work:
        if args.as_run:
            labels = work / "pseudo_labels"
            form = read_manifest(labels)["config"]["history_form"]
            results[str(work)] = {form: lifts_of(labels / "pseudo_labels.parquet", work)}
            continue
        data = load_dataset(work.name, args.ml100k)
        results[str(work)] = {form: lifts(work, data, form) for form in FORMS}
    forms = [form for form in FORMS if all(form in r for r in results.values())]
    print_by_folder(
        "Top-confidence half's AUC minus all rows' AUC (relevance against the truth)",
        f"{'form / confidence':<40}",
        {
            f"{form} / {name}": [r[form][name]["top_minus_all"] for r in results.values()]
            for form in forms
            for name in WEIGHTS
        },
        list(results),
        "+.4f",
    )
    write_diagnostic("confidence_forms", results, args.out)


if __name__ == "__main__":
    main()

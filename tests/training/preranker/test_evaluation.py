"""`evaluate_suite` and the cascade's evaluation: what a library caller of the job gets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.training.preranker.conftest import Run, small_config
from training.evaluation.bootstrap import BootstrapSettings, resample_counts
from training.evaluation.metrics import auc
from training.evaluation.ranking import Evaluation, EvaluationError, ItemInfo, evaluate_scores
from training.evaluation.report import write_report
from training.preranker.data import PrerankData
from training.preranker.job import (
    evaluate_cascade,
    evaluate_suite,
    join_features,
    scored_table,
    split_at,
    time_quantile,
)
from training.preranker.routing import cascade_probabilities, cascade_scores, routed_mask

N_ITEMS = 40
ROWS = 16
STAGES = np.array(["exposed"] * 4 + ["ranked"] * 4 + ["retrieved"] * 8)
INTERVAL = re.compile(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]")


class Cascade:
    """Random requests scored by a weak light and a stronger expressive model.

    One user per request, so the truth joins on (user_id, item_id) and still does when a
    resample draws a request twice, as two requests of their own.
    """

    def __init__(self, n_requests: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        n = n_requests * ROWS
        items = np.concatenate(
            [rng.choice(N_ITEMS, ROWS, replace=False) for _ in range(n_requests)]
        )
        self.label = rng.random(n) < 0.2
        self.data = prerank_data(
            np.array([f"r{r:03d}" for r in range(n_requests)]),
            np.array([f"i{i:02d}" for i in items]),
        )
        self.light = (rng.normal(size=n) + 0.5 * self.label).astype(np.float32)
        self.expressive = (rng.normal(size=n) + 1.5 * self.label).astype(np.float32)
        self.routed = routed_mask(self.light, self.data.offsets, 0.2)
        self.info = ItemInfo(
            np.array([f"i{i:02d}" for i in range(N_ITEMS)], dtype=object),
            rng.normal(size=(N_ITEMS, 3)).astype(np.float32),
            np.array([f"c{i % 5}" for i in range(N_ITEMS)], dtype=object),
            rng.random(N_ITEMS) * 10,
        )
        self.truth = pa.table(
            {
                "user_id": pa.array(self.data.user_ids[self.data.row_request], pa.string()),
                "item_id": pa.array(self.data.item_ids, pa.string()),
                "label": pa.array(self.label.astype(np.int8)),
            }
        )

    def evaluate(self, counts: npt.NDArray[np.float64] | None = None) -> tuple[Evaluation, ...]:
        """(light model, cascade) on the requests, request r drawn ``counts[r]`` times."""
        data, rows = self.data, np.arange(self.data.n_rows)
        if counts is not None:
            drawn = np.repeat(np.arange(data.n_requests), counts.astype(np.int64))
            rows = data.rows_of(drawn)
            data = data.select_requests(drawn)
            copy = np.concatenate([np.arange(k) for k in counts.astype(np.int64) if k])
            data.request_ids = np.array(
                [f"{r}#{c}" for r, c in zip(data.request_ids, copy, strict=True)]
            )
        light, expressive, routed = self.light[rows], self.expressive[rows], self.routed[rows]
        return (
            evaluate_scores(scored_table(data, light), self.truth, self.info),
            evaluate_cascade(data, light, expressive, routed, self.truth, self.info),
        )


def prerank_data(request_ids: npt.NDArray[np.str_], item_ids: npt.NDArray[np.str_]) -> PrerankData:
    """A dataset with ``ROWS`` candidates per request and no features (evaluation needs none)."""
    r, n = len(request_ids), len(item_ids)
    return PrerankData(
        request_ids=request_ids,
        user_ids=request_ids.copy(),
        request_ts=np.zeros(r, np.int64),
        offsets=np.arange(0, n + 1, ROWS, dtype=np.int64),
        user_numeric=np.zeros((r, 0), np.float32),
        history=np.zeros((r, 1), np.int32),
        anchors=np.zeros((r, 1), np.int32),
        row_request=np.repeat(np.arange(r), ROWS).astype(np.int32),
        item_ids=item_ids,
        item_numeric=np.zeros((n, 0), np.float32),
        category=np.zeros(n, np.int64),
        item=np.zeros(n, np.int32),
        group=np.zeros(n, np.int8),
        stage=np.tile(STAGES, r),
        label=np.full(n, np.nan, np.float32),
        pseudo=np.full(n, np.nan, np.float32),
        confidence=np.zeros(n, np.float32),
        cross=np.zeros((n, 4), np.float32),
    )


def test_the_cascade_takes_pooled_aucs_with_their_parts_from_the_served_probabilities() -> None:
    case = Cascade(n_requests=30, seed=0)
    _, cascade = case.evaluate()
    served = cascade_probabilities(case.light, case.expressive, case.routed)
    ordered = cascade_scores(case.light, case.expressive, case.routed)
    assert cascade["auc"] == pytest.approx(auc(case.label, served), abs=1e-12)
    assert cascade["auc"] != pytest.approx(auc(case.label, ordered))  # the +1 offset's AUC
    unexposed = np.tile(STAGES, 30) != "exposed"
    assert cascade["unexposed_auc"] == pytest.approx(
        auc(case.label[unexposed], served[unexposed]), abs=1e-12
    )
    values = cascade.request_values
    assert values is not None
    for name in values.numerator:  # every metric's parts give back its value
        assert values.value(name) == pytest.approx(cascade[name], abs=1e-12), name


def test_the_routing_cell_has_an_interval_that_matches_brute_force_resampling(
    tmp_path: Path,
) -> None:
    # The report's routing@M row used to show "—" for the pooled AUCs: their values came from
    # the served probabilities, their parts from the cascade's order.
    case = Cascade(n_requests=100, seed=1)
    light, cascade = case.evaluate()
    settings = BootstrapSettings(resamples=100, seed=4)
    results = {"exposed": [light], "gpl_hap routing@0.2": [cascade]}
    paths = write_report(results, tmp_path, "Cascade", bootstrap=settings)

    md = paths.markdown.read_text()
    section = md[md.index("## Request-level uncertainty") :]
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line[:2] == "| "}
    header = rows["method"].strip("| ").split(" | ")
    cells = dict(zip(header, rows["gpl_hap routing@0.2"].strip("| ").split(" | "), strict=True))
    assert {"auc", "unexposed_auc"} <= set(cells)
    assert all(INTERVAL.fullmatch(cells[c]) for c in header[1:]), cells

    # Brute force: evaluate the resampled requests (each draw a request of its own) again.
    intervals = json.loads(paths.json.read_text())["bootstrap"]["methods"]["gpl_hap routing@0.2"]
    diffs: dict[str, list[float]] = {}
    for counts in np.concatenate(list(resample_counts(case.data.n_requests, settings))):
        base, routed = case.evaluate(counts)
        for name in ("auc", "unexposed_auc", "gauc", "recall@10", "ndcg@10", "unexposed_ndcg@10"):
            diffs.setdefault(name, []).append(routed[name] - base[name])
    for name, values in diffs.items():
        interval = intervals[name]
        assert interval["difference"] == pytest.approx(cascade[name] - light[name], abs=1e-12)
        low, high = np.nanquantile(values, [0.025, 0.975])
        if name.endswith("gauc") or not name.endswith("auc"):
            # Ratios of per-request sums: the resample's value exactly.
            assert (interval["low"], interval["high"]) == pytest.approx((low, high), abs=1e-12)
        else:
            # Pooled AUCs resample their first-order expansion (training/evaluation/bootstrap.py):
            # the ends are off by a small share of the interval's width (under 2% here).
            width = high - low
            assert interval["low"] == pytest.approx(low, abs=0.05 * width), name
            assert interval["high"] == pytest.approx(high, abs=0.05 * width), name


@pytest.fixture(scope="module")
def tables(run: Run) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(training, evaluation, truth) of the fixture run; a quarter of the rows global negatives."""
    late = pc.greater(run.requests.column("prerank_position"), 12)
    requests = run.requests.set_column(
        run.requests.schema.get_field_index("group"),
        "group",
        pc.if_else(late, "global_negative", run.requests.column("group")),
    )
    split = split_at(requests, time_quantile(requests, 0.8))
    rng = np.random.default_rng(0)
    truth = pa.table(
        {
            "request_id": requests.column("request_id"),
            "user_id": requests.column("user_id"),
            "item_id": requests.column("item_id"),
            "label": pa.array((rng.random(requests.num_rows) < 0.2).astype(np.int8)),
        }
    )
    return (
        join_features(run.store, split.before, labels=False),
        join_features(run.store, split.after, labels=False),
        truth,
    )


def test_evaluate_suite_leaves_global_negatives_out_and_notes_how_many(
    run: Run, tables: tuple[pa.Table, pa.Table, pa.Table], tmp_path: Path
) -> None:
    # Library callers get what `gpl evaluate` does: the filter used to live in the command.
    train, evaluation, truth = tables
    n_global = pc.sum(pc.equal(evaluation.column("group"), "global_negative")).as_py()
    assert n_global > 0
    cfg = small_config(epochs=1)
    result = evaluate_suite(
        train, evaluation, truth, run.semantics, run.items, cfg, tmp_path / "report",
        objectives=["exposed"], seeds=1, notes=["Data: the fixture run."],
        bootstrap=BootstrapSettings(resamples=20, seed=2),
    )  # fmt: skip
    assert result.global_negatives == n_global
    payload = json.loads(result.report.json.read_text())
    for seeds in payload["methods"].values():
        assert seeds["seeds"][0]["rows"] == evaluation.num_rows - n_global
    md = result.report.markdown.read_text()
    note = (
        f"- global_negative rows left out of every metric: {n_global:,} of the "
        f"{evaluation.num_rows:,} evaluation rows"
    )
    assert note in md, md  # a plain note, not a warning
    assert "Warning: global_negative" not in md
    assert "- Data: the fixture run." in md
    assert (payload["bootstrap"]["resamples"], payload["bootstrap"]["seed"]) == (20, 2)

    only_global = evaluation.filter(pc.equal(evaluation.column("group"), "global_negative"))
    with pytest.raises(EvaluationError, match="are all global_negative rows, which serving never"):
        evaluate_suite(
            train, only_global, truth, run.semantics, run.items, cfg, tmp_path / "empty",
            objectives=["exposed"], seeds=1,
        )  # fmt: skip

"""Offline evaluation of pre-rankers: metrics, ranking evaluation against truth, and reports.

* :mod:`training.evaluation.metrics`: AUC (weighted, ties), GAUC, reliability curve.
* :mod:`training.evaluation.ranking`: :func:`~training.evaluation.ranking.evaluate_scores` joins
  scored candidates to a truth table and computes AUC, GAUC, HR/Recall/NDCG@K over all and over
  unexposed candidates, intra-list distance, category recall and long-tail recall, with each
  metric's per-request parts; :func:`~training.evaluation.ranking.without_global_negatives`
  keeps the candidates serving scores.
* :mod:`training.evaluation.bootstrap`: paired request-level bootstrap of metric differences.
* :mod:`training.evaluation.report`: :func:`~training.evaluation.report.write_report` writes the
  markdown + HTML + JSON report (mean ± std over seeds, bootstrap intervals against a baseline)
  with matplotlib plots.
"""

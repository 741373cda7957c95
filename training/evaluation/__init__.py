"""Evaluation metrics shared by benchmarks and the evaluation report."""

"""Evaluation: the simulated clicker and metrics, dataset layouts, latency bench, plots."""

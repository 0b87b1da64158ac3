"""Sweeps: a grid of training configurations times seeds, each member an ordinary DVC experiment.

members (the grid, names, `dvc exp run` command lines), stats (mean/std over seeds, the combined
interval, Holm), report (metrics/sweep.json, reports/sweep/, plots), run (DVC queue and MLflow), cli.
"""

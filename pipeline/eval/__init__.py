"""Evaluation: measures, statistics, judges and their agreement, the eval cache, plots."""

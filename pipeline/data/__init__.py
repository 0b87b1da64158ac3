"""Preference data: source formats, row and pair validation, dedup, decontamination, binarization."""

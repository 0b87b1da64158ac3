"""Verifiable-instruction checkers, shared by the rate and evaluate stages."""

"""Verifiable-instruction checkers (IFEval's 25 instruction ids), shared by rate and evaluate.

`ifeval`: the ids, strict/loose verdicts and IFEval I/O; `instructions`: one checker per id; `text`: word and
sentence tokenizers; `prompts`: the project's prompt files; `cli`: `openrelease ifeval`.
"""

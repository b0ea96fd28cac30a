"""Word n-gram counts of a transcript: the bag-of-n-grams source.

The vocabulary is the word 1- and 2-grams said in at least `MIN_DOCUMENTS` train recordings (the test split
never chooses a column), at most `MAX_VOCABULARY` of them, most widespread first. The cache holds raw counts;
TF-IDF weighting is a preprocessing choice of the search (`scale: tfidf`), fitted on each fold's training part
only, because inverse document frequencies fitted on all recordings would carry the held-out folds into the
weights. The vocabulary itself is chosen without labels, on the train split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from adsearch.transcripts.store import Transcript, tokens

NGRAMS_VERSION = "1"
MIN_DOCUMENTS = 2
MAX_VOCABULARY = 5000


def ngrams(transcript: Transcript) -> list[str]:
    words = [t for w in transcript.words for t in tokens(w.text)]
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def build_vocabulary(train: Iterable[Transcript]) -> list[str]:
    """The n-grams in at least MIN_DOCUMENTS train transcripts; the MAX_VOCABULARY most widespread."""
    documents = Counter(gram for transcript in train for gram in set(ngrams(transcript)))
    kept = sorted((gram for gram, n in documents.items() if n >= MIN_DOCUMENTS), key=lambda g: (-documents[g], g))
    return sorted(kept[:MAX_VOCABULARY])


def ngram_counts(transcript: Transcript, vocabulary: Sequence[str]) -> np.ndarray:
    """How often each vocabulary n-gram occurs in the transcript (float64, in the vocabulary's order)."""
    index = {gram: j for j, gram in enumerate(vocabulary)}
    counts = np.zeros(len(vocabulary))
    for gram in ngrams(transcript):
        if gram in index:
            counts[index[gram]] += 1
    return counts

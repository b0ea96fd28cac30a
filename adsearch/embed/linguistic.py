"""Interpretable linguistic features of a transcript: one vector per recording, named feature by feature.

The definitions follow the DementiaBank / ADReSS(o) literature (`shared/reference/transcripts-mmse-
ensembles.md`): rates, pauses from word timings and from gaps between the participant's speech spans, filled
pauses, repetitions, lexical diversity (moving-average TTR, Brunet's W, Honore's R), word length, Cookie Theft
information units (Croisile et al. 1996, as used by Fraser et al. 2016), empty words and the ASR's confidence.

A feature that a transcript cannot give (no word times in an imported CHAT file, no ASR probabilities) is 0,
and `available` in the cache metadata says which were measured. An empty transcript is a result: no words,
every rate 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from adsearch.transcripts.store import Transcript, tokens

FEATURES_VERSION = "1"
PAUSE_S = 0.25  # a gap between words longer than this is a pause
LONG_PAUSE_S = 2.0
MATTR_WINDOW = 50
LOW_CONFIDENCE = 0.5
FILLED_PAUSES = frozenset({"uh", "um", "er", "ah", "hm", "hmm", "mm", "eh", "uhm"})
EMPTY_WORDS = frozenset({"thing", "things", "stuff", "something", "somebody", "someone", "whatever", "whatnot"})

# Cookie Theft information units: a unit counts once when one of its patterns matches the transcript
# (actions: an agent or object word and an action word within a few words of each other).
_NEAR = r"(?:\W+\w+){0,4}?\W+"
INFORMATION_UNITS: dict[str, str] = {
    "boy": r"\b(boy|son|brother|kid)\b",
    "girl": r"\b(girl|daughter|sister)\b",
    "woman": r"\b(woman|mother|mom|mum|lady|mama)\b",
    "kitchen": r"\bkitchen\b",
    "exterior": r"\b(window|garden|outside|yard|lawn|path|bushes)\b",
    "cookie": r"\bcookies?\b",
    "jar": r"\bjar\b",
    "stool": r"\bstool\b",
    "sink": r"\bsink\b",
    "dish": r"\b(dish|dishes|plate|plates|cups?)\b",
    "dishcloth": r"\b(dishcloth|cloth|towel|rag)\b",
    "water": r"\bwater\b",
    "cupboard": r"\b(cupboard|cabinet|cupboards|cabinets)\b",
    "curtains": r"\b(curtains?|drapes)\b",
    "counter": r"\b(counter|countertop)\b",
    "boy taking cookie": rf"\b(tak\w*|reach\w*|steal\w*|get\w*|grab\w*){_NEAR}(cookies?|jar)\b",
    "stool falling": rf"\b(stool{_NEAR}(fall\w*|tip\w*|topple\w*|over)|(fall\w*|tip\w*){_NEAR}stool)\b",
    "woman drying dishes": rf"\b(dry\w*|drie\w*|wash\w*|wip\w*){_NEAR}(dish\w*|plate\w*)\b",
    "water overflowing": r"\b(overflow\w*|spill\w*|running over|flood\w*)\b",
    "girl asking for cookie": rf"\b(girl|sister){_NEAR}(ask\w*|want\w*|reach\w*){_NEAR}cookies?\b",
    "woman unconcerned": r"\b(not paying attention|doesn't notice|does not notice|unaware|oblivious|daydream\w*)\b",
}

# (name, what it measures); the order is the cache's feature order.
FEATURES: tuple[tuple[str, str], ...] = (
    ("words", "number of words the participant said"),
    ("speech_rate_wpm", "words per minute over the participant's whole speaking turn (first to last span)"),
    ("articulation_rate_wpm", "words per minute of speech, pauses excluded"),
    ("pauses_per_min", f"gaps over {PAUSE_S} s between words, per minute"),
    ("pause_mean_s", "mean length of those gaps"),
    ("pause_longest_s", "longest gap between words"),
    ("long_pause_share", f"share of gaps longer than {LONG_PAUSE_S} s"),
    ("span_gap_mean_s", "mean gap between the participant's speech spans (the interviewer, silence)"),
    ("span_gap_longest_s", "longest gap between the participant's speech spans"),
    ("filled_pauses_per_100w", "uh, um, er, ... per 100 words"),
    ("repetitions_per_100w", "a word or a pair of words said twice in a row, per 100 words"),
    ("type_token_ratio", "distinct words / words"),
    ("mattr", f"moving-average type-token ratio, window {MATTR_WINDOW} words"),
    ("brunet_w", "Brunet's W = N^(V^-0.165) (lower: richer vocabulary)"),
    ("honore_r", "Honore's R = 100 log N / (1 - V1/V) (higher: richer vocabulary)"),
    ("mean_word_length", "mean letters per word"),
    ("information_units", f"Cookie Theft information units mentioned (of {len(INFORMATION_UNITS)})"),
    ("information_units_per_min", "information units per minute of the speaking turn"),
    ("empty_words_per_100w", "thing, stuff, something, ... per 100 words"),
    ("asr_confidence_mean", "mean word probability the ASR gave"),
    ("asr_low_confidence_share", f"share of words with probability under {LOW_CONFIDENCE}"),
)
FEATURE_NAMES = tuple(name for name, _ in FEATURES)
_NEEDS_TIMES = {"speech_rate_wpm", "articulation_rate_wpm", "pauses_per_min", "pause_mean_s", "pause_longest_s",
                "long_pause_share", "information_units_per_min"}
_NEEDS_SPANS = {"span_gap_mean_s", "span_gap_longest_s"}
_NEEDS_PROBABILITY = {"asr_confidence_mean", "asr_low_confidence_share"}


def available(transcript: Transcript) -> dict[str, bool]:
    """Which features this transcript's source can measure (times, spans, probabilities)."""
    timed = bool(transcript.words) and all(w.start is not None for w in transcript.words)
    timed = timed or bool(transcript.spans)
    probable = bool(transcript.words) and all(w.probability is not None for w in transcript.words)
    return {name: not ((name in _NEEDS_TIMES and not timed) or (name in _NEEDS_SPANS and len(transcript.spans) < 2)
                       or (name in _NEEDS_PROBABILITY and not probable)) for name in FEATURE_NAMES}


def linguistic_features(transcript: Transcript) -> np.ndarray:
    """The `FEATURES` of one transcript, float64 in their order."""
    words = [t for w in transcript.words for t in tokens(w.text)]
    n = len(words)
    turn_s, speaking_s, gaps = _timing(transcript)
    per_min = (lambda count: 60 * count / turn_s) if turn_s > 0 else (lambda count: 0.0)
    per_100 = (lambda count: 100 * count / n) if n else (lambda count: 0.0)
    counts = Counter(words)
    types, once = len(counts), sum(1 for c in counts.values() if c == 1)
    span_gaps = [b - e for (_, e), (b, _) in zip(transcript.spans, transcript.spans[1:], strict=False) if b > e]
    units = information_units(" ".join(words))
    probs = [w.probability for w in transcript.words if w.probability is not None]
    values = {
        "words": n,
        "speech_rate_wpm": per_min(n),
        "articulation_rate_wpm": 60 * n / speaking_s if speaking_s > 0 else 0.0,
        "pauses_per_min": per_min(len(gaps)),
        "pause_mean_s": float(np.mean(gaps)) if gaps else 0.0,
        "pause_longest_s": max(gaps, default=0.0),
        "long_pause_share": sum(g > LONG_PAUSE_S for g in gaps) / len(gaps) if gaps else 0.0,
        "span_gap_mean_s": float(np.mean(span_gaps)) if span_gaps else 0.0,
        "span_gap_longest_s": max(span_gaps, default=0.0),
        "filled_pauses_per_100w": per_100(sum(counts[f] for f in FILLED_PAUSES)),
        "repetitions_per_100w": per_100(_repetitions(words)),
        "type_token_ratio": types / n if n else 0.0,
        "mattr": _mattr(words),
        "brunet_w": n ** (types ** -0.165) if n else 0.0,
        "honore_r": 100 * math.log(n) / (1 - once / types) if n and once < types else 0.0,
        "mean_word_length": float(np.mean([len(w) for w in words])) if words else 0.0,
        "information_units": len(units),
        "information_units_per_min": per_min(len(units)),
        "empty_words_per_100w": per_100(sum(counts[w] for w in EMPTY_WORDS)),
        "asr_confidence_mean": float(np.mean(probs)) if probs else 0.0,
        "asr_low_confidence_share": sum(p < LOW_CONFIDENCE for p in probs) / len(probs) if probs else 0.0,
    }
    return np.array([float(values[name]) for name in FEATURE_NAMES])


def information_units(text: str) -> set[str]:
    """The Cookie Theft information units a (lower-case, tokenised) text mentions."""
    return {name for name, pattern in INFORMATION_UNITS.items() if re.search(pattern, text)}


def _timing(transcript: Transcript) -> tuple[float, float, list[float]]:
    """(speaking turn in s, speech in s without pauses, pauses between words in s)."""
    timed = [w for w in transcript.words if w.start is not None and w.end is not None]
    spans = transcript.spans
    if spans:
        turn = spans[-1][1] - spans[0][0] if len(spans) > 1 else spans[0][1] - spans[0][0]
    elif timed:
        turn = timed[-1].end - timed[0].start
    else:
        return 0.0, 0.0, []
    gaps = [b.start - a.end for a, b in zip(timed, timed[1:], strict=False) if b.start - a.end > PAUSE_S
            and not _between_spans(a.end, b.start, spans)]
    speaking = sum(w.end - w.start for w in timed) if timed else sum(e - b for b, e in spans)
    return max(turn, 0.0), speaking, gaps


def _between_spans(end: float, start: float, spans: Sequence[tuple[float, float]]) -> bool:
    """A gap that crosses from one participant span to the next is the interviewer's turn, not a pause."""
    return any(end <= e <= start for _, e in spans[:-1])


def _repetitions(words: Sequence[str]) -> int:
    single = sum(a == b for a, b in zip(words, words[1:], strict=False))
    double = sum(words[i:i + 2] == words[i + 2:i + 4] for i in range(len(words) - 3))
    return single + double


def _mattr(words: Sequence[str]) -> float:
    if not words:
        return 0.0
    if len(words) <= MATTR_WINDOW:
        return len(set(words)) / len(words)
    window = Counter(words[:MATTR_WINDOW])
    ratios = [len(window)]
    for old, new in zip(words, words[MATTR_WINDOW:], strict=False):
        window[old] -= 1
        if not window[old]:
            del window[old]
        window[new] += 1
        ratios.append(len(window))
    return float(np.mean(ratios)) / MATTR_WINDOW


def effect_sizes(X: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[tuple[float, float, float]]:
    """Cohen's d (AD minus control, pooled SD) per column with a 95 % percentile bootstrap interval
    (recordings resampled within each group): which features separate the groups, and how surely."""
    rng = np.random.default_rng(seed)
    ad, cn = X[y == 1], X[y == 0]

    def cohen(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
        return np.divide(a.mean(0) - b.mean(0), pooled, out=np.zeros(X.shape[1]), where=pooled > 0)

    d = cohen(ad, cn)
    boot = np.array([cohen(ad[rng.integers(0, len(ad), len(ad))], cn[rng.integers(0, len(cn), len(cn))])
                     for _ in range(n_boot)])
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return [(float(d[j]), float(low[j]), float(high[j])) for j in range(X.shape[1])]

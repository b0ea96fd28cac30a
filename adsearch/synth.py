"""A synthetic corpus in the exact ADReSSo 2021 diagnosis layout, spoken by eSpeak NG.

It exists so that the demo and the tests run the real importer and the real extractor on real speech
without DementiaBank access. Each participant describes the Cookie Theft picture with a voice, pitch,
rate and loudness drawn independently of the label. The AD group differs only by these markers, each
scaled by ``effect`` (0 = no difference):

* speech rate: slower by up to 22 % (``rate * (1 - 0.22 * effect)``, with per-speaker jitter);
* hesitation pauses inside utterances: more frequent (5 % + 25 % x effect of word gaps) and longer;
* filled pauses ("uh", "um", "er"): in 8 % + 35 % x effect of utterances;
* repetitions of an utterance's first words: in 3 % + 25 % x effect of utterances;
* fewer content units (of the picture's 16) and more empty phrases ("there's a thing there"):
  empty phrases replace content in 5 % + 30 % x effect of utterances.

Every participant talks for a target time drawn independently of the label (20-55 s); slower, hesitant
AD speech fits fewer content units into it, so duration alone is a weak cue. Loudness, background noise
and voice are label-independent too. Audio is written at eSpeak's 22.05 kHz
(deliberately not 16 kHz), with the interviewer's prompts as INV rows and participant utterances as PAR
rows in the segmentation files. `markers.csv` records every recording's drawn parameters for analysis.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

CONTENT_UNITS = [
    ["the boy is standing on a stool", "a little boy is up on the stool"],
    ["the stool is tipping over", "the stool is about to fall over"],
    ["he is taking cookies out of the cookie jar", "the boy is reaching into the cookie jar"],
    ["the girl is reaching up for a cookie", "his sister wants a cookie too"],
    ["she has her finger to her lips", "the girl is telling him to be quiet"],
    ["the mother is drying a dish", "the woman is wiping a plate with a towel"],
    ["the water is running in the sink", "the tap is left on"],
    ["the sink is overflowing", "water is spilling over the edge of the sink"],
    ["there is water all over the floor", "the floor is getting wet"],
    ["she is standing in the puddle", "her feet are in the water"],
    ["the curtains are open", "there are curtains at the window"],
    ["you can see the garden through the window", "outside there is a path and some bushes"],
    ["there are cups and a plate on the counter", "two cups are sitting on the counter"],
    ["the cupboard door is open", "the cabinet is open above the counter"],
    ["the mother is not paying attention", "she does not notice what the children are doing"],
    ["the boy is going to fall", "he is going to get hurt"],
]
EMPTY_PHRASES = [
    "there is a thing there", "and something else over here", "I don't know what that is",
    "that one is doing something", "and the other thing", "it is over there",
]
OPENERS = ["well", "okay", "let me see", "so", "alright"]
FILLERS = ["uh", "um", "er"]
INTERVIEWER_PROMPTS = [
    "tell me everything you see going on in that picture",
    "I want you to tell me all of the things that are happening in this picture",
]
INTERVIEWER_FOLLOWUPS = ["anything else", "mhm", "what else do you see", "okay good"]
# eSpeak NG variants a listener (and Whisper tiny.en: word error rate about 0.1-0.35 on one read description
# each, `python benchmarks/transcribe.py voices`) can follow; en+f1, en+f4, en+anika and en-us+belinda were
# replaced, at 0.36-0.57 they stood for speech no transcriber of a study would accept.
PARTICIPANT_VOICES = ["en-us+m1", "en-us+m3", "en-us+m7", "en+m2", "en+m4", "en+f2", "en-us+f1", "en-us+f3",
                      "en-us+Annie", "en-us+grandma", "en+edward", "en-us+john", "en-us+f4", "en-us+f2"]
INTERVIEWER_VOICES = ["en-us+f5", "en+m6", "en-us+f2"]

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4


class SynthError(RuntimeError):
    pass


class Espeak:
    """Minimal ctypes binding to libespeak-ng (the wheel-bundled one, or the Debian package's)."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        library, data = self._locate()
        self._lib = ctypes.cdll.LoadLibrary(library)
        self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.sample_rate <= 0:
            raise SynthError(f"eSpeak NG failed to initialise from {library}")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # keep a reference: ctypes does not
        self._lib.espeak_SetSynthCallback(self._callback)
        self._seedable = hasattr(self._lib, "espeak_ng_SetRandSeed")  # eSpeak NG 1.51+; older builds cannot

    @staticmethod
    def _locate() -> tuple[str, bytes | None]:
        try:
            import espeakng_loader
        except ImportError:
            found = ctypes.util.find_library("espeak-ng")
            if not found:
                raise SynthError(
                    "eSpeak NG not found: install it with `pip install 'adsearch[synth]'` "
                    "(bundled library) or `apt-get install -y espeak-ng`"
                ) from None
            return found, None
        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path().encode()

    def _collect(self, wav, n_samples, _events) -> int:
        if n_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).astype(np.float32) / 32768)
        return 0

    def speak(self, text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int) -> np.ndarray:
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SynthError(f"eSpeak NG has no voice {voice!r}")
        for parameter, value in ((_RATE, rate_wpm), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, 100)):
            self._lib.espeak_SetParameter(parameter, int(value), 0)
        self._chunks.clear()
        # Some voice variants (en-us+f3, ...) draw from eSpeak NG's own random generator, which differs from
        # run to run unless seeded: without this, --seed 0 gave slightly different audio every time.
        if self._seedable:
            self._lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
        encoded = text.encode()
        self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)


@dataclass
class Speaker:
    """Everything drawn for one recording; written to markers.csv."""

    id: str
    split: str
    label: int
    voice: str
    pitch: int
    pitch_range: int
    rate_wpm: int
    pause_prob: float
    pause_scale: float
    filler_prob: float
    repeat_prob: float
    target_s: float
    empty_prob: float
    gain: float
    noise_db: float
    mmse: float
    spoken: str  # the participant's words as spoken (fillers and repetitions included): the ASR's reference


# Which markers differ between the groups (`--markers`): how a person sounds (rate, hesitation pauses) or what
# they say (filled pauses, repetitions, empty phrases in place of content). The other kind is drawn alike.
MARKER_KINDS = ("all", "acoustic", "linguistic")


def draw_speaker(rng: np.random.Generator, rec_id: str, split: str, label: int, effect: float,
                 markers: str = "all") -> Speaker:
    acoustic = effect * label if markers in ("all", "acoustic") else 0.0
    linguistic = effect * label if markers in ("all", "linguistic") else 0.0
    return Speaker(
        id=rec_id, split=split, label=label,
        voice=str(rng.choice(PARTICIPANT_VOICES)),
        pitch=int(rng.integers(25, 76)),
        pitch_range=int(rng.integers(25, 76)),
        rate_wpm=int(rng.uniform(145, 190) * (1 - 0.22 * acoustic) * rng.uniform(0.92, 1.08)),
        pause_prob=float(np.clip(0.05 + 0.25 * acoustic + rng.normal(0, 0.03), 0, 0.9)),
        pause_scale=float(rng.uniform(0.8, 1.2) * (1 + 1.0 * acoustic)),
        filler_prob=float(np.clip(0.08 + 0.35 * linguistic + rng.normal(0, 0.05), 0, 1)),
        repeat_prob=float(np.clip(0.03 + 0.25 * linguistic + rng.normal(0, 0.03), 0, 1)),
        target_s=float(rng.uniform(20, 55)),
        empty_prob=float(np.clip(0.05 + 0.30 * linguistic + rng.normal(0, 0.03), 0, 0.9)),
        gain=float(rng.uniform(0.5, 1.5)),
        noise_db=float(rng.uniform(-55, -38)),
        mmse=float(np.clip(rng.normal(29, 1) if label == 0 else rng.normal(28 - 8 * effect, 4), 3, 30)),
        spoken="",
    )


def _silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def _utterance_words(rng: np.random.Generator, speaker: Speaker, phrase: str) -> list[str]:
    words = phrase.split()
    if rng.random() < speaker.repeat_prob:
        k = int(rng.integers(1, min(3, len(words)) + 1))
        words = words[:k] + words  # "the boy the boy is ..."
    if rng.random() < speaker.filler_prob:
        words.insert(int(rng.integers(0, len(words))), str(rng.choice(FILLERS)))
    return words


def _speak_utterance(tts: Espeak, rng: np.random.Generator, speaker: Speaker, phrase: str
                     ) -> tuple[np.ndarray, list[str]]:
    """Speak word groups separated by hesitation pauses (kept inside the PAR segment); (audio, words)."""
    pieces, group = [], []
    words = _utterance_words(rng, speaker, phrase)
    for word in words:
        group.append(word)
        if rng.random() < speaker.pause_prob:
            pieces.append(" ".join(group))
            group = []
    if group:
        pieces.append(" ".join(group))
    audio = []
    for i, text in enumerate(pieces):
        if i:
            audio.append(_silence(rng.uniform(0.3, 0.9) * speaker.pause_scale, tts.sample_rate))
        audio.append(tts.speak(text, speaker.voice, speaker.rate_wpm, speaker.pitch, speaker.pitch_range))
    return np.concatenate(audio), words


def _active_rms(audio: np.ndarray, rate: int) -> float:
    """RMS over the louder half of 20 ms frames: loudness of speech, not of the pauses around it."""
    frame = rate // 50
    energy = np.mean(audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2, axis=1)
    return max(float(np.sqrt(np.mean(np.sort(energy)[len(energy) // 2 :]))), 1e-6)


def render_recording(tts: Espeak, rng: np.random.Generator, speaker: Speaker) -> tuple[np.ndarray, list, str]:
    """Return (audio, segmentation rows [(speaker, begin_ms, end_ms)], the participant's words)."""
    rate = tts.sample_rate
    interviewer = str(rng.choice(INTERVIEWER_VOICES))
    units = list(rng.permutation(len(CONTENT_UNITS)))

    timeline: list[np.ndarray] = [_silence(rng.uniform(0.2, 0.8), rate)]
    rows: list[tuple[str, int, int]] = []

    def add(who: str, audio: np.ndarray) -> None:
        begin = sum(len(a) for a in timeline)
        timeline.append(audio)
        rows.append((who, int(1000 * begin / rate), int(1000 * (begin + len(audio)) / rate)))

    add("INV", tts.speak(str(rng.choice(INTERVIEWER_PROMPTS)), interviewer, 170, 50, 50))
    spoken: list[str] = []
    start, followup_asked = sum(len(a) for a in timeline), False
    while units and (sum(len(a) for a in timeline) - start) / rate < speaker.target_s:
        if rng.random() < speaker.empty_prob:
            phrase = str(rng.choice(EMPTY_PHRASES))
        else:
            phrase = str(rng.choice(CONTENT_UNITS[units.pop()]))
        if len(rows) == 1 and rng.random() < 0.6:
            phrase = f"{rng.choice(OPENERS)} {phrase}"
        timeline.append(_silence(rng.uniform(0.25, 0.7), rate))
        audio, words = _speak_utterance(tts, rng, speaker, phrase)
        add("PAR", audio)
        spoken += words
        elapsed = (sum(len(a) for a in timeline) - start) / rate
        if not followup_asked and elapsed > speaker.target_s / 2 and rng.random() < 0.5:
            followup_asked = True
            timeline.append(_silence(rng.uniform(0.3, 0.6), rate))
            add("INV", tts.speak(str(rng.choice(INTERVIEWER_FOLLOWUPS)), interviewer, 170, 50, 50))
    timeline.append(_silence(rng.uniform(0.3, 0.8), rate))
    add("INV", tts.speak("okay thank you", interviewer, 170, 50, 50))
    timeline.append(_silence(rng.uniform(0.2, 0.6), rate))

    audio = np.concatenate(timeline)
    audio *= 0.1 * speaker.gain / _active_rms(audio, rate)
    audio += rng.normal(0, 10 ** (speaker.noise_db / 20), audio.shape).astype(np.float32)
    return np.clip(audio, -1, 1), rows, " ".join(spoken)


def _write_segmentation(path: Path, rows: list, index_column: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(([""] if index_column else []) + ["speaker", "begin", "end"])
        for i, row in enumerate(rows):
            writer.writerow(([i] if index_column else []) + list(row))


MAX_EFFECT = 10.0  # beyond this the markers leave the range speech can have (rates, pause lengths)
MAX_RECORDINGS = 100_000


def synthesize_corpus(
    out: Path | str,
    n_train: int = 166,
    n_test: int = 71,
    effect: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    on_recording: Callable[[str], None] | None = None,
    markers: str = "all",
) -> list[Speaker]:
    """Write `out/ADReSSo21/diagnosis/{train,test-dist}`, `out/task1.csv`, `out/task2.csv` (test MMSE) and
    `out/markers.csv` (with what each participant said, in `spoken`)."""
    if markers not in MARKER_KINDS:
        raise SynthError(f"--markers {markers[:40]!r}: choose {', '.join(MARKER_KINDS)}")
    if n_train < 4 or n_test < 0:
        raise SynthError("need at least 4 training recordings (2 per class) and a non-negative test count")
    if not 0 <= effect <= MAX_EFFECT:
        raise SynthError(f"--effect {effect:g}: give 0 (no group difference) to {MAX_EFFECT:g}; 1 is the default, "
                         "3 already makes the groups far easier to tell apart than on real data")
    if n_train + n_test > MAX_RECORDINGS:
        raise SynthError(f"--n-train + --n-test: at most {MAX_RECORDINGS:,} recordings")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: is a file; name a folder for the corpus")
    base = out / "ADReSSo21" / "diagnosis"
    if base.exists():
        if not overwrite:
            raise SynthError(f"{base} already exists; choose another folder or pass --overwrite")
        shutil.rmtree(base)
    rng = np.random.default_rng(seed)
    tts = Espeak()
    train_labels = rng.permutation([1] * round(n_train * 87 / 166) + [0] * (n_train - round(n_train * 87 / 166)))
    test_labels = rng.permutation([1] * (n_test // 2) + [0] * (n_test - n_test // 2))
    plan = [(f"adrso{i + 1:03d}", "train", int(y)) for i, y in enumerate(train_labels)]
    plan += [(f"adrsdt{i + 1}", "test", int(y)) for i, y in enumerate(test_labels)]

    speakers = []
    for rec_id, split, label in plan:
        speaker = draw_speaker(rng, rec_id, split, label, effect, markers)
        audio, rows, speaker.spoken = render_recording(tts, rng, speaker)
        if split == "train":
            folder = "ad" if label else "cn"
            wav = base / "train" / "audio" / folder / f"{rec_id}.wav"
            seg = base / "train" / "segmentation" / folder / f"{rec_id}.csv"
        else:
            wav = base / "test-dist" / "audio" / f"{rec_id}.wav"
            seg = base / "test-dist" / "segmentation" / f"{rec_id}.csv"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, audio, tts.sample_rate, subtype="PCM_16")
        _write_segmentation(seg, rows, index_column=(split == "train"))
        speakers.append(speaker)
        if on_recording:
            on_recording(rec_id)

    with (base / "train" / "adresso-train-mmse-scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "adressfname", "mmse", "dx"])
        for i, s in enumerate(x for x in speakers if x.split == "train"):
            writer.writerow([i, s.id, round(s.mmse), "ad" if s.label else "cn"])
    with (out / "task1.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Dx"])
        for s in (x for x in speakers if x.split == "test"):
            writer.writerow([s.id, "ProbableAD" if s.label else "Control"])
    with (out / "task2.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "MMSE"])
        for s in (x for x in speakers if x.split == "test"):
            writer.writerow([s.id, round(s.mmse)])
    with (out / "markers.csv").open("w", newline="") as handle:
        fields = list(Speaker.__dataclass_fields__)
        writer = csv.writer(handle)
        writer.writerow(fields)
        for s in speakers:
            writer.writerow([getattr(s, f) for f in fields])
    return speakers

import numpy as np
import pytest
import soundfile as sf
from conftest import write_wav

from adsearch.io.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()]


def test_44k_is_resampled_to_16k_keeping_pitch_and_length(tmp_path):
    path = write_wav(tmp_path / "a.wav", tone(440, 2.0, 44_100), 44_100)
    audio = load_audio(path)
    assert audio.dtype == np.float32
    assert abs(len(audio) - 2 * SAMPLE_RATE) <= 2
    assert abs(dominant_frequency(audio, SAMPLE_RATE) - 440) < 2


def test_resampler_filters_content_above_the_new_nyquist(tmp_path):
    # A 12 kHz tone cannot exist at 16 kHz; naive decimation would alias it to 4 kHz at full strength.
    path = write_wav(tmp_path / "hi.wav", tone(12_000, 1.0, 44_100), 44_100, subtype="FLOAT")
    audio = load_audio(path)
    assert np.sqrt(np.mean(audio**2)) < 0.01 * 0.5 / np.sqrt(2)


def test_stereo_is_downmixed_to_mono(tmp_path):
    left, right = tone(300, 1.0, 16_000), np.zeros(16_000, np.float32)
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], axis=1), 16_000, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.ndim == 1
    np.testing.assert_allclose(audio, left / 2, atol=1e-6)


@pytest.mark.parametrize("subtype,ext", [("PCM_16", "wav"), ("PCM_24", "wav"), ("FLOAT", "wav"), ("PCM_16", "flac")])
def test_pcm_float_and_flac_decode_alike(tmp_path, subtype, ext):
    signal = tone(200, 0.5, 22_050)
    path = tmp_path / f"x.{ext}"
    sf.write(path, signal, 22_050, subtype=subtype)
    reference = load_audio(write_wav(tmp_path / "ref.wav", signal, 22_050, "FLOAT"))
    np.testing.assert_allclose(load_audio(path), reference, atol=2e-4)
    assert audio_duration(path) == pytest.approx(0.5, abs=1e-3)


def test_unreadable_and_empty_files_name_the_file_and_reason(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    with pytest.raises(AudioError, match="corrupt.wav: cannot decode"):
        load_audio(corrupt)
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(empty)
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")

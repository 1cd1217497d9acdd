import io
import urllib.error

import numpy as np
import pytest
import soundfile as sf
import torch

from model.tokenizers.base import BadInput, SpeechTokenizer
from model.tokenizers.speech import CHECKPOINT, EncodecTokenizer, MissingWeights, n_q_for_bandwidth
from model.vocab import Vocab

SR = 24_000


def clip(i: int, seconds: float = 0.25) -> np.ndarray:
    """A voiced-like test signal: a few harmonics of a per-clip pitch plus a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 37 * i
    rng = np.random.default_rng(i)
    wav = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3)) + 0.02 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def wav_bytes(data: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fit_wavs() -> list[np.ndarray]:
    return [clip(i) for i in range(6)]


@pytest.fixture(scope="module")
def tok(fit_wavs) -> EncodecTokenizer:
    return EncodecTokenizer.fit_offline(fit_wavs, bandwidth=1.5, kmeans_iters=1, seed=0)


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network: encodec's download fails as it does offline."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "hub" / "checkpoints"


def test_bandwidth_picks_codebooks():
    assert [n_q_for_bandwidth(b) for b in (1.5, 3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="bandwidth=2.0"):
        n_q_for_bandwidth(2.0)


def test_encode_decode_shapes_and_id_ranges(tok):
    assert isinstance(tok, SpeechTokenizer)
    assert (tok.n_q, tok.codebook_size, tok.sample_rate, tok.frame_rate) == (2, 1024, 24000, 75)
    assert tok.name == "encodec_24khz-offline@1.5kbps"
    wav = clip(9, seconds=0.3)  # 7200 samples -> ceil(7200 / 320) = 23 frames
    codes = tok.encode(wav)
    assert codes.shape == (2, 23) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 1024
    # every kept codebook separates frames (untrained ones give all zeros; a codebook fitted with one centroid
    # per frame leaves a zero residual and the next one collapses to a single code)
    assert all(len(np.unique(row)) > 1 for row in codes)
    vocab = Vocab(text_size=300, n_q=tok.n_q)
    ids = vocab.audio_ids(codes)
    lo, hi = vocab.audio_range()
    assert ids.shape == (46,) and ids.min() >= lo and ids.max() < hi
    assert vocab.audio_range(0)[0] <= ids[0] < vocab.audio_range(0)[1]  # frame-major: codebook 0 first
    assert vocab.audio_range(1)[0] <= ids[1] < vocab.audio_range(1)[1]
    np.testing.assert_array_equal(vocab.audio_codes(ids), codes)
    out = tok.decode(codes)  # untrained decoder: right length, finite, but noise
    assert out.shape == (23 * 320,) and out.dtype == np.float32 and np.isfinite(out).all()
    with pytest.raises(ValueError, match="n_q=2"):
        tok.decode(np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        tok.decode(np.full((2, 5), 1024))


def test_encode_batch_matches_single(tok):
    wavs = [clip(10, 0.1), clip(11, 0.27), clip(12, 0.05)]
    batch = tok.encode_batch(wavs)
    for w, c in zip(wavs, batch):
        alone = tok.encode(w)
        # equal up to a near-tie in the nearest centroid: batched convolutions round differently with the thread
        # count (one frame of 21 flipped after other tests had run); a mixed-up batch changes most codes
        assert c.shape == alone.shape and (c == alone).mean() >= 0.9, (c, alone)
    assert tok.encode_batch([]) == []


def test_offline_fit_is_reproducible_and_saved_state_reloads(tok, fit_wavs, tmp_path):
    probe = clip(20, 0.2)
    path = str(tmp_path / "encodec.safetensors")
    tok.save_offline(path)
    assert open(path, "rb").read(8) != b"\x80\x04\x95"[:8]  # not a pickle
    loaded = EncodecTokenizer.load_offline(path, bandwidth=1.5)
    np.testing.assert_array_equal(loaded.encode(probe), tok.encode(probe))
    assert loaded.fingerprint() == tok.fingerprint()
    rng_before = torch.random.get_rng_state()
    again = EncodecTokenizer.fit_offline(fit_wavs, bandwidth=1.5, kmeans_iters=1, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # fitting does not disturb the caller's RNG
    assert again.fingerprint() == tok.fingerprint()
    # a state fitted for 2 codebooks cannot serve a bandwidth that needs 4
    with pytest.raises(ValueError, match="needs 4"):
        EncodecTokenizer.load_offline(path, bandwidth=3.0)


def test_offline_small_codebooks_keep_the_first_residual(fit_wavs, tmp_path):
    """codebook_size and codebooks: fewer, coarser codes for a small corpus; saved and reloaded like the default."""
    small = EncodecTokenizer.fit_offline(fit_wavs, bandwidth=1.5, codebooks=1, codebook_size=16, kmeans_iters=3)
    assert (small.n_q, small.codebook_size, small.name) == (1, 16, "encodec_24khz-offline@1.5kbps-1x16")
    both = EncodecTokenizer.fit_offline(fit_wavs, bandwidth=1.5, codebook_size=16, kmeans_iters=3)
    assert (both.n_q, both.name) == (2, "encodec_24khz-offline@1.5kbps-2x16")
    probe = clip(21, 0.3)
    codes = small.encode(probe)
    assert codes.shape == (1, 23) and 0 <= codes.min() and codes.max() < 16 and len(np.unique(codes)) > 1
    # residual VQ: one kept codebook is the first codebook of the same fit
    np.testing.assert_array_equal(codes[0], both.encode(probe)[0])
    # batched (beside a shorter, padded clip) = alone, up to a near-tie in the nearest centroid: the batched
    # convolutions round differently (1 of 23 codes flipped in one run); a mixed-up batch changes most codes
    batched = small.encode_batch([clip(22, 0.1), probe])[1]
    assert batched.shape == codes.shape and (batched == codes).mean() >= 0.9, (batched, codes)
    assert small.decode(codes).shape == (23 * 320,)
    vocab = Vocab(text_size=300, n_q=small.n_q, audio_codebook_size=small.codebook_size)
    assert vocab.audio_range()[1] - vocab.audio_range()[0] == 16
    np.testing.assert_array_equal(vocab.audio_codes(vocab.audio_ids(codes)), codes)
    path = str(tmp_path / "encodec.safetensors")
    small.save_offline(path)
    loaded = EncodecTokenizer.load_offline(path, bandwidth=1.5, codebooks=1, codebook_size=16)
    np.testing.assert_array_equal(loaded.encode(probe), codes)
    assert loaded.fingerprint() == small.fingerprint() != both.fingerprint()
    with pytest.raises(ValueError, match="codebooks of 16 codes but speech.codebook_size=1024"):
        EncodecTokenizer.load_offline(path, bandwidth=1.5, codebooks=1)
    with pytest.raises(ValueError, match="power of two"):
        EncodecTokenizer.fit_offline(fit_wavs, codebook_size=24)
    with pytest.raises(ValueError, match="1.5 kbps has 2 codebooks"):
        EncodecTokenizer.fit_offline(fit_wavs, codebooks=3)


def test_offline_fit_needs_audio():
    with pytest.raises(ValueError, match="needs speech"):
        EncodecTokenizer.fit_offline([])


def test_load_mixes_to_mono_and_resamples(tok):
    left, right = clip(1, 0.1), clip(2, 0.1)
    stereo = np.stack([left, right], axis=1)  # (N, C)
    out = tok.load(wav_bytes(stereo, SR, "FLOAT"))
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)
    assert out.dtype == np.float32
    at_16k = tok.load(wav_bytes(np.zeros(1600, dtype=np.float32) + 0.1, 16_000))  # 0.1 s
    assert at_16k.shape == (2400,) and at_16k.dtype == np.float32


def test_bad_audio_raises_bad_input(tok, monkeypatch):
    good = wav_bytes(clip(3, 0.1), SR)
    nan = clip(4, 0.1)
    nan[100] = np.nan
    cases = {
        "empty_file": b"",
        "corrupt_audio": b"RIFF\x00\x00garbage that is no audio",
        "empty_audio": wav_bytes(np.zeros(0, dtype=np.float32), SR),
        "audio_nan": wav_bytes(nan, SR, "FLOAT"),
    }
    for reason, data in cases.items():
        with pytest.raises(BadInput) as e:
            tok.load(data, source="a.wav")
        assert e.value.reason == reason and "a.wav" in str(e.value), reason
    with pytest.raises(BadInput) as e:
        tok.load(good[:30])  # cut inside the header
    assert e.value.reason == "corrupt_audio"


def test_too_long_audio_rejected_from_header_before_reading(tok, monkeypatch):
    # 400 frames whose header says 10 Hz: 40 s > max_seconds=30, in a 1 kB file.
    long_header = wav_bytes(np.zeros(400, dtype=np.float32), 10)

    def never(*a, **k):
        raise AssertionError("samples were read before the length check")

    monkeypatch.setattr(sf, "read", never)
    with pytest.raises(BadInput) as e:
        tok.load(long_header)
    assert e.value.reason == "audio_too_long" and "40.0 s" in str(e.value)


def test_pretrained_offline_gives_clear_error(hub_dir):
    with pytest.raises(MissingWeights) as e:
        EncodecTokenizer.pretrained(bandwidth=1.5)
    msg = str(e.value)
    assert CHECKPOINT in msg and str(hub_dir) in msg and "speech.weights" in msg


def _fake_published_checkpoint(path, monkeypatch) -> torch.nn.Module:
    """A random EnCodec saved the way the published file is, with encodec's checksum check disabled (the real
    file's sha256 prefix cannot be forged)."""
    import encodec.model

    from model.tokenizers.speech import _new_model

    monkeypatch.setattr(encodec.model, "_check_checksum", lambda file, checksum: None)
    torch.manual_seed(3)
    model = _new_model(pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def test_weights_from_a_path_load_the_published_format(hub_dir, tmp_path, monkeypatch):
    ref = _fake_published_checkpoint(tmp_path / "weights" / CHECKPOINT, monkeypatch)
    direct = EncodecTokenizer.from_path(str(tmp_path / "weights" / CHECKPOINT), bandwidth=1.5)
    assert direct.name == "encodec_24khz@1.5kbps"
    assert all(torch.equal(a, b) for a, b in zip(direct.model.state_dict().values(), ref.state_dict().values()))
    assert not (hub_dir / CHECKPOINT).exists()  # a file already carrying its published name is read in place
    # another name (as an s3:// key might have) is copied into the hub cache under the published name
    renamed = tmp_path / "weights" / "encodec.th"
    (tmp_path / "weights" / CHECKPOINT).rename(renamed)
    copied = EncodecTokenizer.from_path(str(renamed), bandwidth=1.5)
    assert (hub_dir / CHECKPOINT).is_file() and copied.fingerprint() == direct.fingerprint()
    # ... and "pretrained" now finds it in the cache without any download
    assert EncodecTokenizer.pretrained(bandwidth=1.5).fingerprint() == direct.fingerprint()


def test_weights_path_errors(hub_dir, tmp_path):
    with pytest.raises(MissingWeights, match="does not exist"):
        EncodecTokenizer.from_path(str(tmp_path / "nope.th"))
    fake = tmp_path / CHECKPOINT
    fake.write_bytes(b"not the published weights")
    with pytest.raises(MissingWeights, match="not EnCodec's published"):
        EncodecTokenizer.from_path(str(fake))
    assert not (hub_dir / CHECKPOINT).exists()


def test_frame_stride_codes_the_mean_of_encoder_frames(fit_wavs, tmp_path):
    """frame_stride 3: one code per 3 encoder frames (25 a second), the nearest centroid to their mean."""
    strided = EncodecTokenizer.fit_offline(fit_wavs, bandwidth=1.5, codebooks=1, codebook_size=16, kmeans_iters=3,
                                           frame_stride=3)
    assert (strided.frame_rate, strided.hop_length) == (25, 960)
    assert strided.name == "encodec_24khz-offline@1.5kbps-1x16-s3"
    probe = clip(21, 0.3)                      # 7,200 samples -> 7.5 codes -> 8, the last over zero padding
    codes = strided.encode(probe)
    assert codes.shape == (1, 8) and len(np.unique(codes)) > 1
    # independently: encoder frames of the zero-padded clip, averaged in threes, nearest row of the codebook
    x = torch.zeros(8 * 960)
    x[: probe.size] = torch.from_numpy(probe)
    with torch.no_grad():
        frames = strided.model.encoder(x.view(1, 1, -1))[0]                 # (D, 24)
        means = frames.view(frames.shape[0], 8, 3).mean(-1).T                # (D, 24) -> (D, 8, 3) -> (8, D)
        embed = strided.model.quantizer.vq.layers[0]._codebook.embed          # (16, D)
        nearest = torch.cdist(means, embed).argmin(1).numpy()                 # (8,)
    assert (nearest == codes[0]).mean() >= 0.85, (nearest, codes)       # float rounding may flip a near-tie
    batched = strided.encode_batch([clip(22, 0.02), probe, clip(23, 0.5)])
    assert [b.shape[1] for b in batched] == [1, 8, 13]
    assert (batched[1] == codes).mean() >= 0.85
    assert strided.decode(codes).shape == (8 * 960,)
    path = str(tmp_path / "encodec.safetensors")
    strided.save_offline(path)
    again = EncodecTokenizer.load_offline(path, bandwidth=1.5, codebooks=1, codebook_size=16, frame_stride=3)
    np.testing.assert_array_equal(again.encode(probe), codes)
    assert again.fingerprint() == strided.fingerprint()
    # the same weights read at another stride are another tokenizer
    single = EncodecTokenizer.load_offline(path, bandwidth=1.5, codebooks=1, codebook_size=16)
    assert single.encode(probe).shape == (1, 23) and single.fingerprint() != strided.fingerprint()
    with pytest.raises(ValueError, match="frame_stride=0"):
        EncodecTokenizer.fit_offline(fit_wavs, frame_stride=0)


def test_frame_stride_config_needs_offline_weights():
    from common.configlib import ConfigError
    from model.tokenizers import SpeechTokenizerConfig

    assert SpeechTokenizerConfig(frame_stride=3).frame_stride == 3
    with pytest.raises(ConfigError, match="needs speech.weights=offline"):
        SpeechTokenizerConfig(frame_stride=3, weights="pretrained")
    with pytest.raises(ConfigError, match="frame_stride=0"):
        SpeechTokenizerConfig(frame_stride=0)

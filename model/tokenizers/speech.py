"""Speech tokenizer: EnCodec 24 kHz (the `encodec` package), codes (n_q, T) at 75 frames per second.

The bandwidth picks how many residual codebooks are kept: 1.5 kbps = 2, 3 = 4, 6 = 8, 12 = 16, 24 kbps = 32
codebooks of 1,024 codes each. `codebooks` keeps only the first N of those (residual VQ: the first codebook alone
is a coarser code of the same frame). Offline weights may also use smaller codebooks (`codebook_size`, a power of
two): a corpus of a few minutes cannot place 1,024 centroids per codebook meaningfully (the demo's 27 s of fitting
audio gave two frames per code), and a model then has to learn an embedding for each of ~1,500 rare ids.
Offline weights may also code several encoder frames as one (`frame_stride`: their mean is quantized, and
decoding repeats it): 3 gives 25 codes a second, so a spoken word is a third as many ids for a model to generate.

Weights (`speech.weights`):
- "pretrained": the published `encodec_24khz-d7cc33bc.th`, from the torch hub cache
  (`~/.cache/torch/hub/checkpoints/`, or `$TORCH_HOME/hub/checkpoints/`); when it is not there, encodec downloads
  it, and without network that fails with a clear error saying how to pre-seed the cache.
- a local or s3:// path to `encodec_24khz-d7cc33bc.th`: copied into the hub cache under its published name (the
  name carries the sha256 prefix encodec checks) and loaded from there.
- "offline": no published weights. A randomly initialised model (seeded) whose codebooks are initialised by
  EnCodec's own k-means on the encoder outputs of a sample of the corpus (see `_init_codebook` for the two changes
  that keep a small corpus's codes well defined); the whole state dict is saved as `encodec.safetensors` beside the
  shards and reloaded by every later step, so codes are reproducible. Such codes separate sounds well enough for
  the demo's speech tasks, but the decoder is untrained: `decode` returns a waveform of the right length that
  sounds like noise. Generated speech is only meaningful with pretrained weights.

Audio is read with soundfile and resampled with torchaudio.functional.resample (pure Python);
torchaudio.load/save are never used (their native libraries are absent in CPU installs, see ENVIRONMENT.md).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
import urllib.error
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import soundfile as sf
import torch

from common import storage
from model.tokenizers.base import BadInput
from model.tokenizers.encodec_spec import (BANDWIDTHS, CODEBOOK_SIZE, SAMPLE_RATE, check_codebook_size, check_codebooks,
                                           check_frame_stride, n_q_for_bandwidth)

if TYPE_CHECKING:
    from encodec import EncodecModel

    from model.tokenizers import SpeechTokenizerConfig

CHECKPOINT = "encodec_24khz-d7cc33bc.th"
# Frames the offline k-means sees, at 1,024 codes (scaled by 1,024 / codebook_size for smaller codebooks): 2,048
# frames (~27 s of audio, two per code) bound the fit to about a second per codebook (`_kmeans`).
KMEANS_MAX_FRAMES = 2048
FRAMES_PER_CODE = 2
# The encoder's last convolution (kernel 7, causal) reflect-pads 6 frames on the left; on fewer than 7 frames it
# first zero-extends the input on the right, so a shorter clip's codes depend on what follows it in a batch.
MIN_BATCH_FRAMES = 7


class MissingWeights(FileNotFoundError):
    """EnCodec weights are not available (no hub cache entry and no network, or a bad `speech.weights` path)."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _new_model(pretrained: bool, repository: Path | None = None,
               codebook_size: int = CODEBOOK_SIZE) -> "EncodecModel":
    from encodec import EncodecModel  # heavy import (torchaudio) only when speech is used
    from encodec.quantization import ResidualVectorQuantizer

    with warnings.catch_warnings():
        # encodec 0.1.1 uses torch.nn.utils.weight_norm, deprecated but working; one warning per layer otherwise
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        model = EncodecModel.encodec_model_24khz(pretrained=pretrained, repository=repository)
    if codebook_size != CODEBOOK_SIZE:  # offline only: the published weights have 1,024 codes per codebook
        q = model.quantizer
        model.quantizer = ResidualVectorQuantizer(dimension=q.dimension, n_q=q.n_q, bins=check_codebook_size(
            codebook_size))
        # EnCodec derives codebooks-per-bandwidth from this; fewer bits per code only raises that count, and
        # `EncodecTokenizer` keeps the first n_q of them.
        model.bits_per_codebook = int(math.log2(codebook_size))
    return model


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class EncodecTokenizer:
    """Implements `model.tokenizers.base.SpeechTokenizer`. Build with `pretrained`, `from_path`, `fit_offline`
    or `load_offline` (or `from_config`)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: "EncodecModel", *, bandwidth: float = 1.5, codebooks: int = 0,
                 offline: bool = False, max_seconds: float = 30.0, frame_stride: int = 1):
        self.n_q = check_codebooks(bandwidth, codebooks)
        self.frame_stride = check_frame_stride(frame_stride)
        self.codebook_size = int(model.quantizer.bins)
        model.set_target_bandwidth(bandwidth)
        model.eval()
        self.model = model
        self.bandwidth = bandwidth
        self.offline = offline
        self.max_seconds = max_seconds
        rate = int(model.frame_rate)                     # 75 encoder frames a second
        # codes a second: 75 / frame_stride (an int where the stride divides 75)
        self.frame_rate = rate // frame_stride if rate % frame_stride == 0 else rate / frame_stride
        self.hop_length = SAMPLE_RATE // rate * frame_stride  # 320 samples per encoder frame
        shape = "" if (codebooks == 0 and self.codebook_size == CODEBOOK_SIZE) else f"-{self.n_q}x{self.codebook_size}"
        shape += f"-s{frame_stride}" if frame_stride > 1 else ""
        self.name = f"encodec_24khz{'-offline' if offline else ''}@{bandwidth:g}kbps{shape}"
        self._fingerprint: str | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: "SpeechTokenizerConfig", offline_state: str = "") -> "EncodecTokenizer":
        """Published weights (`weights` = "pretrained" or a path). For "offline", `offline_state` is the saved
        `encodec.safetensors` (fit a new one with `fit_offline`)."""
        if cfg.weights == "offline":
            if not offline_state:
                raise ValueError("speech.weights=offline: pass the saved encodec.safetensors, or fit one with "
                                 "EncodecTokenizer.fit_offline (TokenizerSet.prepare does this)")
            return cls.load_offline(offline_state, bandwidth=cfg.bandwidth, codebooks=cfg.codebooks,
                                    codebook_size=cfg.codebook_size, max_seconds=cfg.max_seconds,
                                    frame_stride=cfg.frame_stride)
        if cfg.frame_stride != 1:
            raise ValueError(f"speech.frame_stride={cfg.frame_stride} needs speech.weights=offline: the published "
                             "codebooks are fitted on single encoder frames")
        if cfg.codebook_size != CODEBOOK_SIZE:
            raise ValueError(f"speech.codebook_size={cfg.codebook_size} needs speech.weights=offline: the published "
                             f"EnCodec has {CODEBOOK_SIZE} codes per codebook")
        if cfg.weights == "pretrained":
            return cls.pretrained(bandwidth=cfg.bandwidth, codebooks=cfg.codebooks, max_seconds=cfg.max_seconds)
        return cls.from_path(cfg.weights, bandwidth=cfg.bandwidth, codebooks=cfg.codebooks,
                             max_seconds=cfg.max_seconds)

    @classmethod
    def pretrained(cls, bandwidth: float = 1.5, codebooks: int = 0, max_seconds: float = 30.0) -> "EncodecTokenizer":
        """The published weights from the torch hub cache (downloaded by encodec when absent and online)."""
        cached = hub_checkpoint_dir() / CHECKPOINT
        if cached.is_file():
            # Load through `repository`: encodec checks the sha256 prefix and torch.load is weights-only.
            return cls(_load_checked(cached.parent, str(cached)), bandwidth=bandwidth, codebooks=codebooks,
                       max_seconds=max_seconds)
        try:
            model = _new_model(pretrained=True)
        except urllib.error.URLError as e:
            raise MissingWeights(
                f"speech.weights=pretrained: cannot download EnCodec's {CHECKPOINT} ({e.reason}) and it is not in "
                f"the torch hub cache {cached.parent}. Pre-seed it: copy {CHECKPOINT} to {cached.parent}/ (or set "
                f"TORCH_HOME), or set speech.weights to a local or s3:// path of {CHECKPOINT}, or use "
                f"speech.weights=offline for codebooks fitted on the corpus.") from None
        return cls(model, bandwidth=bandwidth, codebooks=codebooks, max_seconds=max_seconds)

    @classmethod
    def from_path(cls, uri: str, bandwidth: float = 1.5, codebooks: int = 0,
                  max_seconds: float = 30.0) -> "EncodecTokenizer":
        """Published weights from a local path or s3:// URI of `encodec_24khz-d7cc33bc.th`."""
        if not storage.exists(uri):
            raise MissingWeights(f"speech.weights={uri} does not exist: give the path of EnCodec's {CHECKPOINT}, "
                                 f"or use speech.weights=pretrained / offline")
        if not storage.is_s3(uri) and Path(uri).name == CHECKPOINT:
            return cls(_load_checked(Path(uri).parent, uri), bandwidth=bandwidth, codebooks=codebooks,
                       max_seconds=max_seconds)
        # encodec reads the checksum from the file name, so the copy keeps the published name; the hub cache
        # makes later loads (e.g. every tokenize actor on this node) skip the copy.
        dest = hub_checkpoint_dir() / CHECKPOINT
        if dest.is_file():
            return cls(_load_checked(dest.parent, f"{dest} (hub cache)"), bandwidth=bandwidth,
                       codebooks=codebooks, max_seconds=max_seconds)
        # Copy into a private folder beside the cache entry, check it there, then rename: a bad or partial copy
        # never lands in the cache, and concurrent actors never read a half-written file.
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".encodec-", dir=dest.parent))
        try:
            storage.download_to(uri, staging / CHECKPOINT)
            model = _load_checked(staging, uri)
            os.replace(staging / CHECKPOINT, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(model, bandwidth=bandwidth, codebooks=codebooks, max_seconds=max_seconds)

    @classmethod
    def fit_offline(cls, wavs: Sequence[np.ndarray], *, bandwidth: float = 1.5, codebooks: int = 0,
                    codebook_size: int = CODEBOOK_SIZE, kmeans_iters: int = 1, fit_samples: int = 64, seed: int = 0,
                    max_seconds: float = 30.0, max_frames: int = 0, frame_stride: int = 1) -> "EncodecTokenizer":
        """A seeded random EnCodec whose first n_q codebooks (of `codebook_size` codes) are initialised by
        EnCodec's k-means on the encoder outputs of up to `fit_samples` waveforms (float32 (N,) at 24 kHz),
        averaged over `frame_stride` frames as `encode` averages them.
        Same inputs + seed -> same state. `max_frames` (0 = as many as fit KMEANS_MAX_FRAMES x 1,024 distances)
        subsamples the frames k-means sees."""
        wavs = [np.asarray(w, dtype=np.float32).reshape(-1) for w in list(wavs)[:fit_samples]]
        wavs = [w for w in wavs if w.size]
        if not wavs:
            raise ValueError("speech.weights=offline needs speech to fit the codebooks on, got no waveforms: pass "
                             "corpus audio to TokenizerSet.prepare(..., wavs=...) or set speech.weights=pretrained")
        n_q = check_codebooks(bandwidth, codebooks)
        max_frames = max_frames or KMEANS_MAX_FRAMES * CODEBOOK_SIZE // check_codebook_size(codebook_size)
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # seeded without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = _new_model(pretrained=False, codebook_size=codebook_size)
            hop = SAMPLE_RATE // int(model.frame_rate) * check_frame_stride(frame_stride)
            # each clip zero-padded to whole codes, so the pooled frames line up with the clips as `encode` cuts them
            padded = [np.pad(w, (0, -w.size % hop)) for w in wavs]
            signal = torch.from_numpy(np.concatenate(padded)).view(1, 1, -1)  # (B=1, C=1, N)
            frames = _pool(model.encoder(signal), frame_stride)[0].T  # (1, D, T) -> (T, D)
            if frames.shape[0] > max_frames:
                frames = frames[torch.randperm(frames.shape[0])[:max_frames].sort().values]  # (max_frames, D)
            # Residual VQ: codebook q is fitted on what codebooks 0..q-1 leave unexplained.
            residual = frames
            for layer in model.quantizer.vq.layers[:n_q]:
                x = layer.project_in(residual)  # identity for the 24 kHz model
                _init_codebook(layer._codebook, x, kmeans_iters)
                residual = residual - layer.project_out(layer._codebook.decode(layer._codebook.encode(x)))
        tok = cls(model, bandwidth=bandwidth, codebooks=codebooks, offline=True, max_seconds=max_seconds,
                  frame_stride=frame_stride)
        probe = tok.encode(wavs[0])
        if not probe.any():
            raise RuntimeError("EnCodec k-means fitting left every code at 0 (codebooks not initialised): "
                               "check the fitting audio is not silent")
        return tok

    @classmethod
    def load_offline(cls, uri: str, bandwidth: float = 1.5, codebooks: int = 0, codebook_size: int = CODEBOOK_SIZE,
                     max_seconds: float = 30.0, frame_stride: int = 1) -> "EncodecTokenizer":
        """Load a state saved by `save_offline` (encodec.safetensors, local or s3://)."""
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(storage.read_bytes(uri))
        embed = state.get("quantizer.vq.layers.0._codebook.embed")
        if embed is not None and embed.shape[0] != codebook_size:
            raise ValueError(f"{uri} has codebooks of {embed.shape[0]} codes but speech.codebook_size={codebook_size}: "
                             "set it back, or fit again into a new tokenizers dir")
        model = _new_model(pretrained=False, codebook_size=codebook_size)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{uri} is not an EnCodec 24 kHz state dict: {e}") from None
        n_q = check_codebooks(bandwidth, codebooks)
        fitted = [bool(layer._codebook.inited) for layer in model.quantizer.vq.layers[:n_q]]
        if not all(fitted):
            raise ValueError(f"{uri} has {sum(fitted)} fitted codebooks but speech.bandwidth={bandwidth} needs {n_q}: "
                             "fit it again at this bandwidth (new tokenizers dir) or lower speech.bandwidth")
        return cls(model, bandwidth=bandwidth, codebooks=codebooks, offline=True, max_seconds=max_seconds,
                   frame_stride=frame_stride)

    def save_offline(self, uri: str) -> None:
        """Whole state dict as safetensors (no pickle), atomically."""
        from safetensors.torch import save as save_safetensors

        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        storage.write_bytes_atomic(uri, save_safetensors(state))

    # ---- bytes -> waveform --------------------------------------------------------------------------------
    def load(self, data: bytes, source: str = "") -> np.ndarray:
        """Audio file bytes (WAV, FLAC, OGG, ...) -> mono float32 (N,) at 24 kHz. Raises BadInput."""
        where = f" ({source})" if source else ""
        if not data:
            raise BadInput("empty_file", f"audio file is empty{where}")
        try:
            info = sf.info(io.BytesIO(data))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            raise BadInput("corrupt_audio", f"cannot read audio header: {e}{where}") from None
        if info.samplerate <= 0:
            raise BadInput("corrupt_audio", f"sample rate {info.samplerate}{where}")
        # Length guard from the header, before any sample is decoded.
        max_frames = int(math.floor(self.max_seconds * info.samplerate))
        if info.frames > max_frames:
            raise BadInput("audio_too_long", f"{info.frames / info.samplerate:.1f} s > speech.max_seconds="
                           f"{self.max_seconds:g}{where}")
        if info.frames == 0:
            raise BadInput("empty_audio", f"audio has no samples{where}")
        try:
            # frames= bounds the read even if the header under-reports the length
            wav, sr = sf.read(io.BytesIO(data), frames=max_frames + 1, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise BadInput("corrupt_audio", f"cannot decode audio samples: {e}{where}") from None
        if wav.shape[0] > max_frames:
            raise BadInput("audio_too_long", f"more than speech.max_seconds={self.max_seconds:g} s{where}")
        if wav.shape[0] == 0:
            raise BadInput("empty_audio", f"audio has no samples{where}")
        if not np.isfinite(wav).all():
            raise BadInput("audio_nan", f"audio has NaN or infinite samples{where}")
        mono = torch.from_numpy(wav.mean(axis=1))  # (N, C) -> (N,)
        if sr != SAMPLE_RATE:
            import torchaudio.functional as AF  # pure-Python part of torchaudio

            mono = AF.resample(mono, sr, SAMPLE_RATE)
        return mono.numpy().astype(np.float32, copy=False)

    # ---- waveform <-> codes -------------------------------------------------------------------------------
    def n_frames(self, n_samples: int) -> int:
        return math.ceil(n_samples / self.hop_length)

    def _padded(self, wav: np.ndarray, n_samples: int) -> torch.Tensor:
        """Zero-pad to `n_samples` (a multiple of the hop): the last partial frame then sees silence, whether the
        clip is encoded alone or in a batch (EnCodec would otherwise reflect-pad it)."""
        out = torch.zeros(n_samples)
        out[: wav.size] = torch.from_numpy(wav)
        return out

    def _check_wav(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1 or wav.size == 0:
            raise ValueError(f"{self.name}: expected a non-empty mono waveform (N,), got shape {wav.shape}")
        return wav

    @torch.inference_mode()
    def encode(self, wav: np.ndarray) -> np.ndarray:
        """float32 (N,) at 24 kHz -> int64 codes (n_q, ceil(N / 320))."""
        wav = self._check_wav(wav)
        x = self._padded(wav, self.n_frames(wav.size) * self.hop_length).view(1, 1, -1)  # (B=1, C=1, N)
        return self._codes(x)[0, : self.n_q].to(torch.int64).numpy()  # (n_q, T): the first n_q residual codebooks

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, N), N a multiple of the hop -> codes (B, n_q', N / hop) of every codebook the bandwidth uses.
        What `EncodecModel.encode` does for the 24 kHz model (one segment, no normalisation), with the encoder
        frames pooled in between."""
        emb = _pool(self.model.encoder(x), self.frame_stride)  # (B, D, N / hop)
        # the codebook count for the bandwidth at the encoder's own frame rate, whatever the stride
        return self.model.quantizer.encode(emb, self.model.frame_rate, self.bandwidth).transpose(0, 1)

    @torch.inference_mode()
    def encode_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several waveforms in one forward, each zero-padded to the longest; gives the codes `encode` gives, up to
        a near-tie between two centroids that the batched convolutions' rounding may flip.

        The 24 kHz model is causal, so silence after a clip does not change its codes, with one exception: a
        convolution whose input is shorter than its padding pads past the end, so clips under
        MIN_BATCH_FRAMES frames (~0.09 s) would see the padding; those are encoded alone."""
        wavs = [self._check_wav(w) for w in wavs]
        out: list[np.ndarray | None] = [None] * len(wavs)
        batched = [i for i, w in enumerate(wavs) if self.n_frames(w.size) * self.frame_stride >= MIN_BATCH_FRAMES]
        for i in set(range(len(wavs))) - set(batched):
            out[i] = self.encode(wavs[i])
        if batched:
            n = max(self.n_frames(wavs[i].size) for i in batched) * self.hop_length
            x = torch.stack([self._padded(wavs[i], n) for i in batched]).unsqueeze(1)  # (B, C=1, N)
            codes = self._codes(x)[:, : self.n_q].to(torch.int64).numpy()  # (B, n_q' >= n_q, T_max) -> (B, n_q, T_max)
            for row, i in enumerate(batched):
                out[i] = codes[row, :, : self.n_frames(wavs[i].size)].copy()  # (n_q, T_i)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes (n_q, T) -> float32 waveform (T * hop,) at 24 kHz (a strided code's vector held for its frames)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.n_q:
            raise ValueError(f"{self.name}: expected codes (n_q={self.n_q}, T), got {codes.shape}")
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"{self.name}: codes outside [0, {self.codebook_size})")
        c = torch.from_numpy(codes.astype(np.int64)).unsqueeze(0)  # (B=1, n_q, T)
        emb = self.model.quantizer.decode(c.transpose(0, 1))  # (n_q, 1, T) -> (1, D, T)
        if self.frame_stride > 1:
            emb = emb.repeat_interleave(self.frame_stride, dim=-1)  # (1, D, T) -> (1, D, T * s)
        wav = self.model.decoder(emb)  # (1, 1, T * hop)
        return wav[0, 0].float().numpy()

    def fingerprint(self) -> str:
        """Hash of the bandwidth and every weight: two tokenizers agree on codes iff their fingerprints agree."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.name};{_state_hash(self.model)}".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"EncodecTokenizer({self.name}, n_q={self.n_q})"


def _pool(emb: torch.Tensor, stride: int) -> torch.Tensor:
    """Encoder frames (B, D, T * stride) -> their means over each `stride` consecutive frames (B, D, T)."""
    if stride == 1:
        return emb
    b, d, t = emb.shape
    return emb.view(b, d, t // stride, stride).mean(-1)  # (B, D, T * s) -> (B, D, T, s) -> (B, D, T)


def _kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means as EnCodec's `core_vq.kmeans` runs it (k random frames as the start, empty clusters keep
    their centroid), with distances as one matrix product instead of an (N, k, D) difference tensor: 8,192
    frames x 256 codes x 10 iterations take ~1 s instead of ~40. x: (N, D) -> means (k, D), cluster sizes (k,)."""
    means = x[torch.randperm(x.shape[0])[:k]] if x.shape[0] >= k else x[torch.randint(0, x.shape[0], (k,))]
    for _ in range(iters):
        d = (x * x).sum(1, keepdim=True) - 2 * x @ means.T + (means * means).sum(1)   # (N, k) squared distances
        buckets = d.argmin(1)                                                        # (N,)
        bins = torch.bincount(buckets, minlength=k)                                  # (k,)
        sums = torch.zeros_like(means).index_add_(0, buckets, x)                     # (k, D)
        means = torch.where((bins == 0)[:, None], means, sums / bins.clamp(min=1)[:, None].to(x.dtype))
    return means, bins


def _init_codebook(codebook: torch.nn.Module, frames: torch.Tensor, iters: int) -> None:
    """EnCodec's k-means initialisation of one codebook (`EuclideanCodebook.init_embed_`, which a training-mode
    forward runs on its first batch), with two changes that keep the codes of a small corpus well defined:

    - at most one centroid per FRAMES_PER_CODE frames. With as many centroids as frames every frame becomes its
      own centroid, the residual is exactly zero and every later codebook collapses to one code.
    - no EMA update afterwards (the training forward runs one, which divides each centroid by its cluster size
      because `embed_avg` starts as the centroids), and repeated centroids (identical frames, e.g. digital
      silence) are moved out of reach: between two equal centroids the chosen code would depend on float noise
      (batch size, thread count), so the same audio could get different codes.
    Unused rows are set to one far-away vector that no frame in the fitted range is nearest to."""
    k = min(codebook.codebook_size, max(1, frames.shape[0] // FRAMES_PER_CODE))
    means, bins = _kmeans(frames, k, iters)  # (k, D), (k,)
    far = 10.0 * (frames.abs().max() + 1e-3)
    embed = torch.full((codebook.codebook_size, frames.shape[1]), float(far), dtype=frames.dtype)  # (K, D)
    cluster_size = torch.zeros(codebook.codebook_size, dtype=frames.dtype)
    seen: set[bytes] = set()
    for i in range(k):
        key = means[i].numpy().tobytes()
        if key not in seen:
            seen.add(key)
            embed[i] = means[i]
            cluster_size[i] = bins[i]
    codebook.embed.data.copy_(embed)
    codebook.embed_avg.data.copy_(embed)
    codebook.cluster_size.data.copy_(cluster_size)
    codebook.inited.data.fill_(1.0)


def _load_checked(repository: Path, what: str) -> "EncodecModel":
    """Published weights from `repository/encodec_24khz-d7cc33bc.th`, its sha256 prefix checked by encodec."""
    try:
        return _new_model(pretrained=True, repository=repository)
    except RuntimeError as e:
        if "checksum" in str(e).lower():
            raise MissingWeights(f"speech.weights: {what} is not EnCodec's published {CHECKPOINT} ({e}); replace it "
                                 "with the original file") from None
        raise


__all__ = ["EncodecTokenizer", "MissingWeights", "CHECKPOINT", "BANDWIDTHS", "SAMPLE_RATE", "n_q_for_bandwidth",
           "hub_checkpoint_dir"]

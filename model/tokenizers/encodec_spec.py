"""EnCodec 24 kHz's code layout (sample rate, bandwidths, codebooks) and the checks of the speech settings
against it, apart from the model: validating a config imports no torch."""
from __future__ import annotations

SAMPLE_RATE = 24_000
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)
CODEBOOK_SIZE = 1024


def n_q_for_bandwidth(bandwidth: float) -> int:
    if bandwidth not in BANDWIDTHS:
        raise ValueError(f"speech.bandwidth={bandwidth} is not an EnCodec 24 kHz bandwidth; use one of {BANDWIDTHS}")
    # 75 frames/s x 10 bits per code = 0.75 kbps per codebook
    return int(round(bandwidth / 0.75))


def check_codebooks(bandwidth: float, codebooks: int) -> int:
    """The number of codebooks kept: `codebooks`, or all of the bandwidth's when 0."""
    n_q = n_q_for_bandwidth(bandwidth)
    if not 0 <= codebooks <= n_q:
        raise ValueError(f"speech.codebooks={codebooks}: {bandwidth:g} kbps has {n_q} codebooks (0 keeps all)")
    return codebooks or n_q


def check_codebook_size(size: int) -> int:
    if not (2 <= size <= CODEBOOK_SIZE and size & (size - 1) == 0):
        raise ValueError(f"speech.codebook_size={size} must be a power of two in [2, {CODEBOOK_SIZE}] (EnCodec's "
                         "quantizer packs codes as bits)")
    return size


def check_frame_stride(stride: int) -> int:
    if not 1 <= stride <= 75:
        raise ValueError(f"speech.frame_stride={stride} must be in [1, 75] (encoder frames per code; 75 a second)")
    return stride

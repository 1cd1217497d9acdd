"""GLM-4-Voice speech codes, read precomputed: the speech side of the released Omni-Diffusion checkpoint.

The reference turns 16 kHz speech into one stream of 12.5 codes per second from a 16,384-entry codebook (its
`<|audio_i|>` tokens). This product does not run that tokenizer or its flow-matching decoder: speech comes as
codes the reference's tokenizer already made (the `speech_codes` field of a messages JSONL line), so shards
tokenized for the reference can be trained on and the released checkpoint can be fine-tuned and evaluated on
them. Raw audio cannot be encoded with this kind and codes cannot be turned back into waveforms here; both
say so. EnCodec (model/tokenizers/speech.py) stays the default speech tokenizer.
"""
from __future__ import annotations

import numpy as np

from model.tokenizers.base import BadInput
from model.vocab import GLM4VOICE_CODEBOOK_SIZE


class Glm4VoiceCodes:
    """Implements `model.tokenizers.base.SpeechTokenizer` for precomputed codes (n_q = 1)."""
    name = "glm4voice"
    n_q = 1
    codebook_size = GLM4VOICE_CODEBOOK_SIZE
    sample_rate = 16_000
    frame_rate = 12.5            # codes per second (EnCodec: 75 frames per second, n_q codes each)
    precomputed_codes = True     # tokenize_jobs/sources.py accepts `speech_codes` only from such a tokenizer

    def load(self, data: bytes, source: str = "") -> np.ndarray:
        raise BadInput("needs_speech_codes",
                       f"{source or 'audio'}: speech.kind=glm4voice reads the reference's precomputed codes (the "
                       f"messages line's \"speech_codes\" field); raw audio is not encoded with this kind. Give "
                       f"the codes, or tokenize with speech.kind=encodec")

    def encode(self, wav: np.ndarray) -> np.ndarray:
        raise BadInput("needs_speech_codes", "speech.kind=glm4voice does not encode waveforms; give speech_codes")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            "speech.kind=glm4voice: GLM-4-Voice's decoder (flow matching + HiFi-GAN) is not part of this product; "
            "the generated codes are in the output (audio_codes) for the reference's decoder")

    def fingerprint(self) -> str:
        return f"glm4voice-{self.codebook_size}"

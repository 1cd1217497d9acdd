"""model/vocab.py: id ranges, code <-> id round trips, serialization and the mismatch check."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.vocab import SPECIALS, Modality, PromptFormat, Vocab, VocabMismatch, dream_vocab

VOCAB = Vocab(text_size=50, text_tokenizer="bytes", n_q=3, audio_codebook_size=16, image_codebook_size=20)


def test_ranges_are_contiguous_and_ordered():
    v = VOCAB
    assert v.text_range() == (0, 50)
    assert v.special_offset == 50 and v.audio_offset == 50 + len(SPECIALS)
    assert v.audio_range() == (v.audio_offset, v.audio_offset + 3 * 16) == (v.audio_offset, v.image_offset)
    assert [v.audio_range(q) for q in range(3)] == [(v.audio_offset + 16 * q, v.audio_offset + 16 * (q + 1))
                                                    for q in range(3)]
    assert v.image_range() == (v.image_offset, v.image_offset + 20) and v.size == v.image_offset + 20
    specials = list(v.special_ids().values())
    assert specials == list(range(v.special_offset, v.audio_offset))
    assert len({v.mask_id, v.eos_id, v.im_start_id, v.im_end_id, v.boi_id, v.eoi_id, v.boa_id, v.eoa_id,
                v.role_id("user")}) == 9
    assert v.pad_id == v.eos_id
    with pytest.raises(ValueError, match="codebook 3"):
        v.audio_range(3)
    with pytest.raises(ValueError, match="role"):
        v.role_id("robot")


def test_audio_ids_are_frame_major_and_round_trip():
    codes = np.arange(3 * 4).reshape(3, 4) % 16                     # (n_q, T)
    ids = VOCAB.audio_ids(codes)
    assert ids.shape == (12,) and ids.dtype == np.int64
    # frame 1, codebook 2 sits at flat position 1 * n_q + 2, in codebook 2's range
    assert ids[1 * 3 + 2] == VOCAB.audio_range(2)[0] + codes[2, 1]
    assert all(VOCAB.audio_range(i % 3)[0] <= x < VOCAB.audio_range(i % 3)[1] for i, x in enumerate(ids))
    np.testing.assert_array_equal(VOCAB.audio_codes(ids), codes)
    np.testing.assert_array_equal(VOCAB.audio_codes(np.append(ids, ids[0])), codes)   # partial frame dropped
    wrong = ids.copy()
    wrong[0] = VOCAB.image_offset                                      # a sampled id of the wrong range
    assert VOCAB.audio_codes(wrong)[0, 0] == 0
    with pytest.raises(ValueError, match="n_q=3"):
        VOCAB.audio_ids(codes[:2])
    with pytest.raises(ValueError, match="outside"):
        VOCAB.audio_ids(codes + 16)


def test_image_ids_round_trip():
    codes = np.array([[0, 19], [7, 3]])
    ids = VOCAB.image_ids(codes)
    assert ids.min() >= VOCAB.image_offset and ids.max() < VOCAB.size
    np.testing.assert_array_equal(VOCAB.image_codes(ids), codes)
    assert VOCAB.image_codes(np.array([0]))[0] == 0                    # text id in an image span -> code 0
    with pytest.raises(ValueError, match="outside"):
        VOCAB.image_ids(np.array([20]))


def test_json_round_trip_and_fingerprint():
    v = dream_vocab(text_fingerprint="abc")
    back = Vocab.from_json(v.to_json())
    assert back == v and back.fingerprint() == v.fingerprint()
    assert VOCAB.fingerprint() != v.fingerprint()
    d = v.to_dict()
    d["layout"]["size"] += 1
    with pytest.raises(ValueError, match="layout size"):
        Vocab.from_dict(d)
    with pytest.raises(ValueError, match="unknown keys"):
        Vocab.from_dict({**VOCAB.to_dict(), "colour": 1})


def test_check_same_names_what_differs():
    VOCAB.check_same(Vocab.from_json(VOCAB.to_json()))
    other = Vocab(text_size=50, text_tokenizer="bytes", n_q=4, audio_codebook_size=16, image_codebook_size=20)
    with pytest.raises(VocabMismatch) as e:
        VOCAB.check_same(other, what="shards", expected="checkpoint")
    msg = str(e.value)
    assert "vocabulary of the shards differs from the checkpoint's" in msg
    assert "n_q: 3 != 4" in msg and "Re-tokenize the shards" in msg
    assert "text_size" not in msg


def test_reused_specials():
    v = dream_vocab(prompt_format=PromptFormat.COMPACT)
    assert v.mask_id < v.text_size and v.eos_id < v.text_size
    assert v.boi_id == v.special_offset + SPECIALS.index("boi")        # not reused: our own range
    with pytest.raises(ValueError, match="outside the text range"):
        Vocab(text_size=10, reuse_specials={"mask": 10})
    with pytest.raises(ValueError, match="unknown special"):
        Vocab(text_size=10, reuse_specials={"sep": 1})
    ids = torch.tensor([0, v.mask_id, v.audio_offset, v.image_offset, v.boa_id])
    assert v.modality_of(ids).tolist() == [Modality.TEXT, Modality.SPECIAL, Modality.AUDIO, Modality.IMAGE,
                                           Modality.SPECIAL]


def test_allowed_ids():
    text = VOCAB.allowed_ids(Modality.TEXT)
    assert text.shape == (VOCAB.size,) and text[:50].all()
    assert text[VOCAB.eos_id] and text[VOCAB.im_end_id] and not text[VOCAB.mask_id] and not text[VOCAB.boi_id]
    audio = VOCAB.allowed_ids(Modality.AUDIO, vocab_rows=VOCAB.size + 7)   # padded embedding rows
    assert audio.shape == (VOCAB.size + 7,) and audio.sum() == 3 * 16
    assert audio[VOCAB.audio_offset:VOCAB.image_offset].all() and not audio[VOCAB.size:].any()
    image = VOCAB.allowed_ids(Modality.IMAGE)
    assert image.sum() == 20 and image[VOCAB.image_offset:].all()
    with pytest.raises(ValueError, match="embedding rows"):
        VOCAB.allowed_ids(Modality.TEXT, vocab_rows=VOCAB.size - 1)
    dv = dream_vocab()
    dtext = dv.allowed_ids(Modality.TEXT)
    assert not dtext[dv.mask_id] and not dtext[dv.im_start_id] and dtext[dv.eos_id] and dtext[dv.im_end_id]
    special = dv.allowed_ids(Modality.SPECIAL)
    # the special ids that are really used, reused ones included; never the mask
    assert special.nonzero().flatten().tolist() == sorted(set(dv.special_ids().values()) - {dv.mask_id})


def test_dream_vocab_fits_the_dream_preset():
    v = dream_vocab()
    rows = ModelConfig.preset("dream-7b").vocab_size
    assert rows == 176_264 and v.size <= rows
    assert v.text_size == 151_688       # Dream's tokenizer + the reference's 21 multimodal tokens
    assert dream_vocab(prompt_format=PromptFormat.COMPACT).text_size == 152_064   # Qwen2's embedding rows
    assert v.allowed_ids(Modality.IMAGE, vocab_rows=rows).shape == (rows,)

"""A tiny random Whisper (model, byte-level BPE tokenizer, feature extractor) saved to a local folder.

With `only_word`, generation may emit that one word token and nothing else (every other id is suppressed), so
the transcript of any non-empty clip is known: the word repeated `max_new_tokens` times (its generation
config's limit, which the judge keeps). That makes the judge's plumbing
checkable end to end without trained weights."""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


def write_tiny_whisper(folder: str | Path, *, only_word: str = "hello", max_new_tokens: int = 2, seed: int = 0,
                       spelling: dict[str, str] | None = None) -> Path:
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["hello", "world", "seven", "the", "cat"]
    # byte-level BPE: every byte is a symbol; whole words (with the leading-space marker Ġ) are merged tokens
    byte_symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]
    vocab = {s: i for i, s in enumerate(byte_symbols)}
    merges = []
    for w in words:
        for tok in (w, "Ġ" + w):
            for k in range(2, len(tok) + 1):
                piece = tok[:k]
                if piece not in vocab:
                    merges.append(f"{tok[:k - 1]} {tok[k - 1]}")
                    vocab[piece] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    normalizer = folder / "normalizer.json"
    normalizer.write_text(json.dumps(spelling or {"colour": "color"}))
    tok = WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), normalizer_file=str(normalizer))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fe = WhisperFeatureExtractor(feature_size=80)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(folder)

    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    keep = tok.convert_tokens_to_ids("Ġ" + only_word)
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=64,
                        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                        eos_token_id=ids["<|endoftext|>"], decoder_start_token_id=ids["<|startoftranscript|>"])
    model = WhisperForConditionalGeneration(cfg).eval()
    gen = model.generation_config
    gen.decoder_start_token_id = ids["<|startoftranscript|>"]
    gen.suppress_tokens = [i for i in range(len(tok)) if i != keep]
    gen.begin_suppress_tokens = None
    gen.max_new_tokens = max_new_tokens
    model.save_pretrained(folder)
    return folder

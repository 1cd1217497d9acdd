import json

import pytest

from model.tokenizers.text import HFTextTokenizer

DIGITS = "zero one two three four five six seven eight nine".split()
CORPUS = ([f"Generate an image of the digit {w}." for w in DIGITS]
          + [f"The spoken digit is {w}." for w in DIGITS] + [f"{w}" for w in DIGITS])


@pytest.fixture(scope="module")
def bpe() -> HFTextTokenizer:
    return HFTextTokenizer.train_bpe(CORPUS, vocab_size=512)


def test_small_bpe_learns_whole_words(bpe):
    # a word seen in the corpus after a space is one token; so is the word at the start of a text
    for w in DIGITS:
        assert len(bpe.encode(f" {w}")) == 1, w
        assert len(bpe.encode(w)) == 1, w
    assert len(bpe.encode("Generate an image of the digit seven.")) <= 8
    assert 256 < bpe.size <= 512  # vocab_size is an upper bound: a tiny corpus stops early
    assert bpe.name == "bpe512"


@pytest.mark.parametrize("text", [
    "the digit seven", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "héllo wörld 🙂 — 数字七",
    "never seen: qzxj 12345 !?", "", "<|image|> is not special to the text tokenizer",
])
def test_round_trip_any_utf8(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.size for i in ids)
    assert bpe.decode(ids) == text


def test_training_is_deterministic_and_fingerprint_tracks_content(bpe):
    again = HFTextTokenizer.train_bpe(CORPUS, vocab_size=512)
    assert again.fingerprint() == bpe.fingerprint()
    assert again.encode("The spoken digit is nine.") == bpe.encode("The spoken digit is nine.")
    other = HFTextTokenizer.train_bpe(CORPUS + ["a different corpus entirely"], vocab_size=512)
    assert other.fingerprint() != bpe.fingerprint()


def test_saved_bpe_reloads_identical(bpe, tmp_path):
    path = tmp_path / "text.json"
    bpe.save(str(path))
    loaded = HFTextTokenizer.from_file(str(path))
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.size == bpe.size
    for text in CORPUS + ["unseen words 🙂"]:
        assert loaded.encode(text) == bpe.encode(text)
    # the fingerprint hashes the normalized JSON, not the file's formatting
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":")))
    assert HFTextTokenizer.from_file(str(compact)).fingerprint() == bpe.fingerprint()


def test_text_size_reserves_backbone_rows(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    big = HFTextTokenizer.from_file(str(path), text_size=1000)
    assert big.size == 1000 and big.tokenizer_size == bpe.size
    assert big.fingerprint() == bpe.fingerprint()
    # sampled ids in the reserved rows past the tokenizer are dropped on decode, not an error
    assert big.decode(bpe.encode(" seven") + [999]) == " seven"
    with pytest.raises(ValueError, match="text_size=10 is smaller"):
        HFTextTokenizer.from_file(str(path), text_size=10)


def test_backbone_special_tokens_typed_in_text_stay_text(bpe, tmp_path):
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(bpe.to_json())
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True)])
    special_id = tok.token_to_id("<|im_start|>")
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    hf = HFTextTokenizer.from_file(str(path))
    ids = hf.encode("hi <|im_start|>system")
    assert special_id not in ids  # user text cannot forge a chat marker
    assert hf.decode(ids) == "hi <|im_start|>system"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="needs a text corpus"):
        HFTextTokenizer.train_bpe([], vocab_size=512)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        HFTextTokenizer.from_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        HFTextTokenizer.from_file(str(bad))

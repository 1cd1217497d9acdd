"""Training refuses shards whose text tokenizer is not the backbone's (model/weights.py check_text_tokenizer): the
shards' vocabulary records the fingerprint of the text tokenizer the tokenize job used; the backbone's checkpoint
directory (local or s3://) holds its tokenizer.json. Built on a scaled-down Dream tokenizer through a real
TokenizerSet, so the fingerprint compared is the one the tokenize job records."""
from __future__ import annotations

import dataclasses
import logging

import pytest
from tokenizers import AddedToken

from common import cli, storage
from model.tokenizers import (ImageTokenizerConfig, SpeechTokenizerConfig, TextTokenizerConfig, TokenizerConfig,
                              TokenizerSet)
from model.tokenizers.text import HFTextTokenizer
from model.vocab import PromptFormat, VocabMismatch
from model.weights import backbone_tokenizer_uri, check_text_tokenizer
from pipelines.train.trainer import main as train_main
from tests.helpers.moto_s3 import moto_s3
from tests.helpers.shardgen import small_vocab, write_shard_set
from tests.unit.test_reference_format import tiny_dream_tokenizer


def other_tokenizer() -> str:
    """The same tokenizer with one more added token: every id it shares is the same, yet it is not the same
    tokenizer (what a backbone of another release looks like)."""
    tok = tiny_dream_tokenizer()
    tok.add_special_tokens([AddedToken("<|fim_prefix|>", special=True, normalized=False)])
    return tok.to_str()


@pytest.fixture(scope="module")
def shards_vocab(tmp_path_factory):
    """The vocabulary a tokenize job records for Dream-style text in the reference format."""
    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_text(tiny_dream_tokenizer().to_str())
    cfg = TokenizerConfig(text=TextTokenizerConfig(kind="hf", path=str(d / "tokenizer.json")),
                          image=ImageTokenizerConfig(kind="pixel", size=2, channels=1, levels=4),
                          speech=SpeechTokenizerConfig(kind="glm4voice"), prompt_format=PromptFormat.REFERENCE)
    return TokenizerSet.prepare(cfg, str(d / "set")).vocab


def backbone(path, tokenizer_json: str | None):
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def test_same_tokenizer_passes_and_another_is_refused_naming_both(shards_vocab, tmp_path):
    same = backbone(tmp_path / "dream", tiny_dream_tokenizer().to_str())
    check_text_tokenizer(shards_vocab, same, "s3://b/tokens/messages/")
    check_text_tokenizer(shards_vocab, same / "model.safetensors", "s3://b/tokens/messages/")   # a single file
    other = backbone(tmp_path / "other", other_tokenizer())
    theirs = HFTextTokenizer.from_json(other_tokenizer()).with_added_tokens([]).fingerprint()
    with pytest.raises(VocabMismatch) as e:
        check_text_tokenizer(shards_vocab, other, "s3://b/tokens/messages/")
    msg = str(e.value)
    assert f"shards s3://b/tokens/messages/ were tokenized with text tokenizer 'hf' (fingerprint " \
           f"{shards_vocab.text_fingerprint}" in msg
    assert "s3://b/tokens/messages/tokenizers/text.json" in msg
    assert f"the backbone {other} has {other}/tokenizer.json (fingerprint " in msg
    assert shards_vocab.text_fingerprint != theirs and "text.path=" in msg


def test_compact_shards_compare_the_plain_tokenizer(tmp_path):
    # COMPACT vocabularies keep the backbone's tokenizer as it is (no reference tokens added)
    fp = HFTextTokenizer.from_json(tiny_dream_tokenizer().to_str()).fingerprint()
    vocab = dataclasses.replace(small_vocab(), text_tokenizer="hf", text_fingerprint=fp)
    check_text_tokenizer(vocab, backbone(tmp_path / "dream", tiny_dream_tokenizer().to_str()), "shards")
    with pytest.raises(VocabMismatch, match=fp):
        check_text_tokenizer(vocab, backbone(tmp_path / "other", other_tokenizer()), "shards")


def test_unknown_identity_is_logged_not_refused(shards_vocab, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        check_text_tokenizer(shards_vocab, backbone(tmp_path / "bare", None), "shards")
        check_text_tokenizer(dataclasses.replace(shards_vocab, text_fingerprint=""),
                             backbone(tmp_path / "other", other_tokenizer()), "shards")
    assert "has no tokenizer.json" in caplog.text and "record no text tokenizer fingerprint" in caplog.text


def test_backbone_on_s3(shards_vocab):
    with moto_s3():
        storage.filesystem("s3://backbone-tok").mkdir("backbone-tok")
        storage.write_text_atomic("s3://backbone-tok/dream/tokenizer.json", tiny_dream_tokenizer().to_str())
        storage.write_text_atomic("s3://backbone-tok/other/tokenizer.json", other_tokenizer())
        assert backbone_tokenizer_uri("s3://backbone-tok/dream/") == "s3://backbone-tok/dream/tokenizer.json"
        single = backbone_tokenizer_uri("s3://backbone-tok/dream/model.safetensors")
        assert single == "s3://backbone-tok/dream/tokenizer.json"
        check_text_tokenizer(shards_vocab, "s3://backbone-tok/dream/", "shards")
        with pytest.raises(VocabMismatch, match="s3://backbone-tok/other/tokenizer.json"):
            check_text_tokenizer(shards_vocab, "s3://backbone-tok/other", "shards")


def test_training_refuses_before_any_worker_starts(tmp_path, capsys):
    fp = HFTextTokenizer.from_json(tiny_dream_tokenizer().to_str()).fingerprint()
    vocab = dataclasses.replace(small_vocab(), text_tokenizer="hf", text_fingerprint=fp)
    shards = write_shard_set(tmp_path / "tok", vocab, {"t2i": 4})
    other = backbone(tmp_path / "other", other_tokenizer())
    status = train_main(["--config", "configs/train/debug.yaml", "--shards", str(shards), "--run-dir",
                         str(tmp_path / "run"), "train.init.kind=pretrained", f"train.init.path={other}"])
    err = capsys.readouterr().err
    assert status == cli.BAD_INPUT, err
    assert "text tokenizer mismatch" in err and fp in err and f"{other}/tokenizer.json" in err
    assert not (tmp_path / "run").exists()   # nothing started, nothing written

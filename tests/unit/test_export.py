"""pipelines/export.py: the export's files and config.json, written and read back; what a reader refuses and how
it names the fault; where the training run's MLflow store is found."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer
from pipelines import export
from tests.helpers.shardgen import small_vocab

VOCAB = small_vocab()


@pytest.fixture
def written(tmp_path) -> tuple[Path, Transformer]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("debug"), vocab_size=VOCAB.size)
    tok = tmp_path / "shards" / "tokenizers"
    (tok / "text").mkdir(parents=True)
    (tok / "tokenizers.json").write_text("{}")
    (tok / "text" / "bpe.json").write_text("{}")
    out = tmp_path / "export"
    export.write(str(out), model.state_dict(),
                 model_config=dataclasses.replace(model.cfg, vocab_size=model.vocab_size), vocab=VOCAB,
                 tokenizers_uri=str(tok), step=12, run_name="r1", mlflow_run_id="abc")
    return out, model


def test_write_then_read_round_trips(written):
    out, model = written
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizers", "vocab.json"]
    assert (out / "tokenizers" / "text" / "bpe.json").is_file()          # the tree is copied, not just its top
    ex = export.read(str(out))
    assert (ex.config.step, ex.config.run_name, ex.config.mlflow_run_id) == (12, "r1", "abc")
    assert ex.config.model == dataclasses.replace(model.cfg, vocab_size=VOCAB.size)
    assert ex.config.files == ["model.safetensors", "vocab.json", "tokenizers/"]
    assert ex.vocab() == VOCAB
    assert torch.equal(ex.state_dict()["output.weight"], model.output.weight)
    assert export.read_config(str(out)) == ex.config
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == VOCAB.size


def test_rewriting_removes_the_old_config_first(written, monkeypatch):
    """A writer that dies mid-way leaves no config.json: the half-new export is refused, never read as the old."""
    out, model = written

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("model.weights.save_safetensors", dies)
    with pytest.raises(OSError, match="disk full"):
        export.write(str(out), model.state_dict(), model_config=model.cfg, vocab=VOCAB, tokenizers_uri=None, step=13)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        export.read(str(out))


def test_reader_names_what_is_missing_or_malformed(written, tmp_path):
    out, _ = written
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        export.read(str(tmp_path / "nope"))

    def variant(name: str) -> Path:
        return Path(shutil.copytree(out, tmp_path / name))

    unfinished = variant("unfinished")
    (unfinished / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config.json.*written last.*omnidiff train"):
        export.read(str(unfinished))
    for name, missing in (("no_weights", "model.safetensors"), ("no_vocab", "vocab.json")):
        broken = variant(name)
        (broken / missing).unlink()
        with pytest.raises(FileNotFoundError, match=f"lacks {missing}"):
            export.read(str(broken))
    no_tok = variant("no_tok")
    shutil.rmtree(no_tok / "tokenizers")
    with pytest.raises(FileNotFoundError, match="lacks tokenizers/.*omnidiff tokenize"):
        export.read(str(no_tok))
    for name, text, match in (("not_json", "{", "not JSON"),
                              ("no_model", json.dumps({"step": 1}), "expected"),
                              ("bad_step", json.dumps({"model": {}, "step": "many"}), "step: expected an integer"),
                              ("unknown", json.dumps({"model": {}, "mlflow": {}}), r"unknown key\(s\) \['mlflow'\]")):
        bad = variant(name)
        (bad / "config.json").write_text(text)
        with pytest.raises(export.ExportError, match=match) as e:
            export.read(str(bad))
        assert str(bad / "config.json") in str(e.value)


def test_an_export_without_tokenizers_is_written_but_refused(tmp_path):
    model = Transformer(ModelConfig.preset("debug"), vocab_size=VOCAB.size)
    config = export.write(str(tmp_path / "e"), model.state_dict(), model_config=model.cfg, vocab=VOCAB,
                          tokenizers_uri=str(tmp_path / "none"), step=1)
    assert config.files == ["model.safetensors", "vocab.json"]
    with pytest.raises(FileNotFoundError, match="lacks tokenizers/"):
        export.read(str(tmp_path / "e"))


def test_mlflow_run_finds_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = export.ExportConfig(model=ModelConfig(), mlflow_run_id="abc")
    local = str(tmp_path / "run" / "export")
    assert export.mlflow_run(config, local) is None                       # no store anywhere
    assert export.mlflow_run(config, local, "http://x") == ("http://x", "abc")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env")
    assert export.mlflow_run(config, local) == ("http://env", "abc")
    assert export.mlflow_run(config, local, "http://x") == ("http://x", "abc")   # explicit wins
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mlflow.db").write_bytes(b"")
    assert export.mlflow_run(config, local) == (f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}", "abc")
    assert export.mlflow_run(config, "s3://b/run/export") is None         # no local store beside an S3 export
    assert export.mlflow_run(export.ExportConfig(model=ModelConfig()), local) is None   # no run recorded

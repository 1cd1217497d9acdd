"""The training export: the folder `omnidiff train` writes at the end of a run, and the only thing `sample`,
`generate`, `eval` and the demo read a trained model from. This module is the one that writes and reads it.

    <export>/                  a local folder or an s3:// prefix (`<run-dir>/export` by default)
      model.safetensors        every weight, consolidated to full fp32 tensors under the model's own key names
                               (model/weights.py); its header also holds the model config and vocab.json
      vocab.json               the vocabulary the model was trained with (model/vocab.py, `Vocab.to_json`)
      tokenizers/              the tokenizer set the training shards were made with (model/tokenizers), copied
                               from `<shards>/tokenizers/`; sampling needs it to turn answers back into media
      config.json              written last: while it is absent the export is incomplete (being written, or
                               the writer died), and readers refuse it

    config.json = {"model": {ModelConfig fields, vocab_size = the weights' embedding rows},
                   "step": training steps done, "run_name": the run's name,
                   "mlflow_run_id": the training run's MLflow run (null when tracking was off),
                   "files": what the writer wrote, e.g. ["model.safetensors", "vocab.json", "tokenizers/"]}

The MLflow tracking URI is not recorded: an embedded store's sqlite path is only valid on the machine that
trained. `mlflow_run` finds the store (an explicit URI, $MLFLOW_TRACKING_URI, or `<run-dir>/mlflow.db` beside a
local export). An s3:// export is read through a local cache (`$OMNIDIFF_CACHE`, default ~/.cache/omnidiff),
downloaded again when its config.json or weights change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import configlib, storage
from model.config import ModelConfig
from model.vocab import Vocab

WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"
TOKENIZERS = "tokenizers"
CONFIG = "config.json"
REQUIRED = (WEIGHTS, VOCAB, TOKENIZERS)   # besides config.json
WHAT = ("a training export (<run-dir>/export, written by `omnidiff train` at the end of a run: "
        f"{WEIGHTS}, {VOCAB}, {TOKENIZERS}/, {CONFIG})")


class ExportError(ValueError):
    """An export's config.json or files do not have the export's format; the message names the file."""


@dataclass
class ExportConfig:
    """config.json (module docstring)."""
    model: ModelConfig
    step: int = 0
    run_name: str = ""
    mlflow_run_id: str | None = None
    files: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(configlib.to_dict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ExportConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"{where}: not JSON ({e}); rewrite the export (rerun `omnidiff train` with the same "
                              f"run.name and --run-dir: it resumes from the last checkpoint and exports again)"
                              ) from None
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ExportError(f"{where}: expected {{\"model\": {{...}}, \"step\": ..., \"run_name\": ..., "
                              f"\"mlflow_run_id\": ...}}; is this {WHAT}?")
        try:
            return configlib.from_dict(cls, data)
        except configlib.ConfigError as e:
            raise ExportError(f"{where}: {e} (the export's format: pipelines/export.py)") from None


# ---- writing ----------------------------------------------------------------------------------------------

def _copy_tree(src: str, dest: str) -> None:
    """Every file under `src` to the same relative path under `dest` (either side local or s3://)."""
    base = src.replace("s3://", "").rstrip("/") if storage.is_s3(src) else src
    for entry in storage.find(src):
        rel = entry[len(base) + 1:] if storage.is_s3(src) else os.path.relpath(entry, src)
        storage.write_bytes_atomic(storage.join(dest, rel),
                                   storage.read_bytes(f"s3://{entry}" if storage.is_s3(src) else entry))


def write(out_uri: str, state: dict[str, torch.Tensor], *, model_config: ModelConfig, vocab: Vocab,
          tokenizers_uri: str | None, step: int, run_name: str = "", mlflow_run_id: str | None = None
          ) -> ExportConfig:
    """Write an export of the full (not sharded) `state` to `out_uri` (local or s3://). `model_config.vocab_size`
    must be the weights' embedding rows. `tokenizers_uri` (the shards' tokenizers/ folder) is copied in; without
    one the export holds weights but cannot be sampled, and readers say so. Any config.json already there is
    removed first, so a reader never pairs an earlier run's config with these weights."""
    from model.weights import save_safetensors

    storage.remove(storage.join(out_uri, CONFIG))
    cfg_json = json.dumps(configlib.to_dict(model_config), indent=2)
    with tempfile.TemporaryDirectory(prefix="export-") as d:
        local = Path(d) / WEIGHTS
        save_safetensors(state, local, metadata={"model_config": cfg_json, "vocab": vocab.to_json()})
        storage.upload_file_atomic(local, storage.join(out_uri, WEIGHTS))
    storage.write_text_atomic(storage.join(out_uri, VOCAB), vocab.to_json())
    files = [WEIGHTS, VOCAB]
    if tokenizers_uri and storage.exists(tokenizers_uri):
        _copy_tree(tokenizers_uri, storage.join(out_uri, TOKENIZERS))
        files.append(TOKENIZERS + "/")
    config = ExportConfig(model=model_config, step=int(step), run_name=run_name, mlflow_run_id=mlflow_run_id,
                          files=files)
    storage.write_text_atomic(storage.join(out_uri, CONFIG), config.to_json())
    return config


# ---- reading ----------------------------------------------------------------------------------------------

@dataclass
class Export:
    """An export as a checked local folder: every file of the format is present and config.json parses."""
    path: Path                   # local folder (the export itself, or its cached download)
    config: ExportConfig
    source: str                  # the export as given (local path or s3:// URI)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def tokenizers_dir(self) -> str:
        return str(self.path / TOKENIZERS)

    def vocab(self) -> Vocab:
        return Vocab.from_json((self.path / VOCAB).read_text())

    def tokenizers(self):
        """The export's TokenizerSet, checked against its vocab.json (the vocabulary the weights index)."""
        from model.tokenizers import TokenizerSet

        tokenizers = TokenizerSet.load(self.tokenizers_dir)
        self.vocab().check_same(tokenizers.vocab, what=f"export's {TOKENIZERS}/ ({self.tokenizers_dir})",
                                expected=f"export's {VOCAB} ({self.path / VOCAB})")
        return tokenizers

    def state_dict(self) -> dict[str, torch.Tensor]:
        from model.weights import load_native

        return load_native(self.weights)[0]


def read_config(uri: str) -> ExportConfig:
    """config.json of the export at `uri` (local or s3://), without downloading the rest."""
    where = storage.join(uri, CONFIG)
    try:
        text = storage.read_text(where)
    except FileNotFoundError:
        raise FileNotFoundError(_incomplete(uri)) from None
    return ExportConfig.from_json(text, where)


def read(uri: str) -> Export:
    """The export at `uri` (local folder or s3:// prefix) as a checked local folder. Raises FileNotFoundError
    naming what is missing, ExportError when config.json does not parse."""
    path = localize(uri)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(_incomplete(uri))
    missing = [f"{name}/" if name == TOKENIZERS else name for name in REQUIRED if not (path / name).exists()]
    if missing:
        hint = (f"; {TOKENIZERS}/ is copied from the training shards' tokenizers/ folder, which these shards lack: "
                f"tokenize with `omnidiff tokenize` (it writes one)" if missing == [f"{TOKENIZERS}/"] else "")
        raise FileNotFoundError(f"checkpoint {uri} lacks {', '.join(missing)}: give {WHAT}{hint}")
    return Export(path, ExportConfig.from_json((path / CONFIG).read_text(), str(path / CONFIG)), str(uri))


def _incomplete(uri: str) -> str:
    return (f"checkpoint {uri} has no {CONFIG}: either it is not {WHAT}, or its writer has not finished "
            f"({CONFIG} is written last). Wait for training to end, or rerun `omnidiff train` with the same "
            f"run.name and --run-dir: it resumes from the last checkpoint and exports again")


def cache_root() -> Path:
    return Path(os.environ.get("OMNIDIFF_CACHE", Path.home() / ".cache" / "omnidiff")) / "exports"


def localize(uri: str) -> Path:
    """The export as a local folder: itself when local, else a cached download of the s3:// prefix (fetched
    again when the remote config.json or weights size changed)."""
    if not storage.is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {uri} is not a folder: give {WHAT}")
        return path
    base = uri.rstrip("/")
    try:
        remote_config = storage.read_bytes(storage.join(base, CONFIG))
    except FileNotFoundError:
        raise FileNotFoundError(_incomplete(uri)) from None
    try:
        weights_size = storage.info(storage.join(base, WEIGHTS))["size"]
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {uri} lacks {WEIGHTS}: give {WHAT}") from None
    stamp = hashlib.sha256(remote_config + str(weights_size).encode()).hexdigest()
    dest = cache_root() / hashlib.sha256(base.encode()).hexdigest()[:16]
    marker = dest / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        storage.call(lambda fs: fs.get(base + "/", str(staging), recursive=True), base, "downloading")
        (staging / ".complete").write_text(stamp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)  # concurrent loaders never see a half-downloaded export
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def mlflow_run(config: ExportConfig, export_uri: str, tracking_uri: str = "") -> tuple[str, str] | None:
    """(tracking_uri, run_id) of the training run, or None when the export names no run or no store is found.
    The store: `tracking_uri`, else $MLFLOW_TRACKING_URI, else the trainer's default store beside a local export
    (<run-dir>/mlflow.db for <run-dir>/export)."""
    if not config.mlflow_run_id:
        return None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri and export_uri and not storage.is_s3(export_uri):
        db = Path(export_uri).resolve().parent / "mlflow.db"
        uri = f"sqlite:///{db}" if db.is_file() else ""
    return (uri, config.mlflow_run_id) if uri else None


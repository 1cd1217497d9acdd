"""common/cli.py: the exit-status table, the errors of every layer mapped onto it, and the wrapper's one line."""
from __future__ import annotations

import argparse

import pytest

from common import cli
from common.configlib import ConfigError
from common.storage import StorageError
from model.tokenizers.base import BadInput
from model.vocab import VocabMismatch
from pipelines.export import ExportError
from tokenize_jobs.lock import LockHeld
from tokenize_jobs.run import OutputError
from tokenize_jobs.sources import InputError


@pytest.mark.parametrize("error, code", [
    (ConfigError("train.lr: expected a number"), cli.BAD_INPUT),
    (BadInput("missing_file", "x.png"), cli.BAD_INPUT),
    (VocabMismatch("n_q differs"), cli.BAD_INPUT),
    (ExportError("config.json: not JSON"), cli.BAD_INPUT),
    (InputError("input gone"), cli.BAD_INPUT),
    (OutputError("not writable"), cli.BAD_INPUT),
    (FileNotFoundError("no such file"), cli.BAD_INPUT),
    (ValueError("--tasks: unknown"), cli.BAD_INPUT),
    (LockHeld("held by host:1"), cli.LOCKED),
    (StorageError("reading s3://b/k failed after 3 attempt(s)", "s3://b/k"), cli.STORAGE),
    (cli.Failed("training failed"), cli.FAILED),
    (KeyError("x"), cli.FAILED),
    (RuntimeError("boom"), cli.FAILED),
])
def test_each_error_has_its_code(error, code):
    assert cli.exit_code(error) == code


def test_a_cause_keeps_its_code():
    try:
        try:
            raise StorageError("uploading s3://b/k failed", "s3://b/k")
        except StorageError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as e:
        assert cli.exit_code(e) == cli.STORAGE
    # only an explicit cause counts: an error raised while handling another is judged by itself
    try:
        try:
            raise LockHeld("held")
        except LockHeld:
            raise KeyError("bug in the handler")  # noqa: B904
    except KeyError as e:
        assert cli.exit_code(e) == cli.FAILED


def _main(error: BaseException | None, returns: int | None = None):
    @cli.command
    def main(argv=None):
        parser = argparse.ArgumentParser(prog="omnidiff test")
        parser.add_argument("--n", type=int, default=0)
        parser.parse_args(argv)
        if error is not None:
            raise error
        return returns
    return main


def test_wrapper_prints_one_line_for_known_errors(capsys, monkeypatch):
    monkeypatch.delenv("OMNIDIFF_TRACEBACK", raising=False)
    assert _main(LockHeld("output runs/tok is locked by host:42"))([]) == cli.LOCKED
    assert capsys.readouterr().err == "error: output runs/tok is locked by host:42\n"
    assert _main(cli.Failed("training failed: worker 1 died"))([]) == cli.FAILED
    assert capsys.readouterr().err == "error: training failed: worker 1 died\n"
    monkeypatch.setenv("OMNIDIFF_TRACEBACK", "1")
    assert _main(ConfigError("train.lr: expected a number"))([]) == cli.BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: train.lr: expected a number\n")


def test_wrapper_prints_the_traceback_of_an_unexpected_error(capsys):
    assert _main(KeyError("vocab_size"))([]) == cli.FAILED
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: KeyError: 'vocab_size'\n")


def test_wrapper_passes_return_values_and_argparse_exits(capsys):
    assert _main(None)([]) == cli.OK
    assert _main(None, returns=cli.NOT_MET)(["--n", "3"]) == cli.NOT_MET
    with pytest.raises(SystemExit) as e:
        _main(None)(["--n", "three"])
    assert e.value.code == cli.BAD_INPUT and "invalid int value" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        _main(KeyboardInterrupt())([])


def test_codes_are_distinct_and_documented():
    codes = [cli.OK, cli.FAILED, cli.BAD_INPUT, cli.LOCKED, cli.STORAGE, cli.NOT_MET]
    assert codes == [0, 1, 2, 3, 4, 5]
    for code in codes:
        assert f"{code} " in cli.EXIT_STATUS_HELP and f"    {code}  " in cli.__doc__

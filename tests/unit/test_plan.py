"""model/plan.py: exact parameter counts of the reference backbones and the CLI's verdict."""
from __future__ import annotations

import pytest

from model.plan import main, plan


def test_dream_7b_parameter_count():
    p = plan("dream-7b", gpus=8, gpu_mem_gb=80, seq_len=3072)
    # Qwen2.5-7B has 7,615,616,512; Dream's embedding and head grow from 152,064 to 176,264 rows.
    assert p["params"] == 7_615_616_512 + 2 * (176_264 - 152_064) * 3584 == 7_789_082_112
    assert p["fits"]
    assert 40e9 < p["flops_per_token"] < 50e9          # ~6N + attention
    assert p["flops_per_token"] == pytest.approx(3 * p["flops_per_token_forward"])


def test_llada_8b_parameter_count():
    p = plan("llada-8b", gpus=8, gpu_mem_gb=80, seq_len=4096)
    assert 7.9e9 < p["params"] < 8.1e9                  # "LLaDA 8B"


def test_memory_plan_responds_to_its_inputs():
    base = dict(gpus=8, gpu_mem_gb=80, seq_len=3072)
    ac = plan("dream-7b", activation_checkpointing=True, **base)
    no_ac = plan("dream-7b", activation_checkpointing=False, **base)
    assert no_ac["memory_gib"]["activations"] > 5 * ac["memory_gib"]["activations"]
    more_gpus = plan("dream-7b", **{**base, "gpus": 64})
    assert more_gpus["memory_gib"]["sharded params+grads+AdamW (fp32)"] == pytest.approx(
        ac["memory_gib"]["sharded params+grads+AdamW (fp32)"] / 8)
    longer = plan("dream-7b", **{**base, "seq_len": 6144})
    assert longer["memory_gib"]["logits and loss"] == pytest.approx(2 * ac["memory_gib"]["logits and loss"])
    assert not plan("dream-7b", gpus=1, gpu_mem_gb=80, seq_len=3072)["fits"]   # 16 bytes/param alone is 116 GiB


def test_cli_prints_table_and_verdict(capsys):
    assert main(["--model", "dream-7b", "--gpus", "8", "--gpu-mem-gb", "80", "--seq-len", "3072",
                 "--micro-batch", "1", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "7,789,082,112" in out and "activations" in out and "verdict             fits" in out
    # a negative answer is not a crash (1): its own exit status
    assert main(["--model", "dream-7b", "--gpus", "2", "--gpu-mem-gb", "40", "--no-activation-checkpointing"]) == 5
    assert "does not fit" in capsys.readouterr().out


def test_cli_needs_vocab_size_for_vocabulary_sized_presets(capsys):
    assert main(["--model", "debug"]) == 2
    assert (err := capsys.readouterr().err).startswith("error: ") and "--vocab-size" in err
    assert main(["--model", "debug", "--vocab-size", "1000", "--gpus", "1", "--gpu-mem-gb", "8"]) == 0


def test_cli_reads_a_model_yaml(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("preset: debug\nn_layers: 3\nvocab_size: 500\n")
    assert main(["--model", str(path), "--gpus", "1", "--gpu-mem-gb", "8"]) == 0
    assert "n_layers 3" in capsys.readouterr().out

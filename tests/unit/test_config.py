"""common/configlib.py and the ModelConfig presets of model/config.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from common import configlib
from common.configlib import ConfigError
from model.config import ModelConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["train", "eval"] = "train"
    resume: bool = False


def test_defaults_then_preset_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: demo, n_layers: 6}\noptim: {lr: 1.0e-4}\nsteps: 100\n")
    run = configlib.load(Run, path, ["model.n_heads=8", "steps=200", "tags=[a, b]", "resume=true"])
    demo = ModelConfig.preset("demo")
    assert run.model.dim == demo.dim and run.model.hidden_dim == demo.hidden_dim     # from the preset
    assert run.model.n_layers == 6 and run.model.n_heads == 8                        # YAML, then override
    assert run.optim == Optim(lr=1e-4) and run.steps == 200 and run.tags == ["a", "b"] and run.resume is True
    # an override naming a preset resets the section: the YAML's n_layers no longer applies
    reset = configlib.load(Run, path, ["model.preset=debug"])
    assert reset.model == ModelConfig.preset("debug")


def test_yaml_scientific_notation_and_underscores():
    run = configlib.load(Run, None, ["optim.lr=3e-4", "steps=1_000", "name=7"])
    assert run.optim.lr == 3e-4 and run.steps == 1000 and run.name == "7"
    assert configlib.load(Run, None, ["name=null"]).name is None
    assert configlib.load(Run, None, ["optim.betas=[0.8, 0.9]"]).optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("override,match", [
    (["model.nlayers=3"], r"model: unknown key\(s\) \['nlayers'\]; valid keys: \[.*'n_layers'"),
    (["steps=ten"], "steps: expected an integer, got 'ten'"),
    (["steps=1.5"], "steps: expected an integer"),
    (["resume=yes please"], "resume: expected true/false"),
    (["mode=serve"], r"mode: 'serve' is not one of \['train', 'eval'\]"),
    (["optim=3"], "optim: expected a section"),
    (["tags=a"], "tags: expected a list"),
    (["model.preset=huge"], "unknown model preset 'huge'; presets: .*dream-7b"),
    (["model.n_heads=3"], "model.dim=64 is not divisible by model.n_heads=3"),
    (["steps"], "not of the form section.key=value"),
])
def test_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        configlib.load(Run, None, override)


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 1\nstepz: 2\n")
    with pytest.raises(ConfigError, match=rf"stepz.*\(from {path}\)"):
        configlib.load(Run, path)
    with pytest.raises(ConfigError, match="does not exist"):
        configlib.load(Run, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        configlib.load(Run, tmp_path / "list.yaml")


def test_dump_and_reload_round_trip():
    run = configlib.load(Run, None, ["model.preset=dream-7b", "tags=[x]", "optim.betas=[0.9, 0.99]"])
    assert configlib.from_dict(Run, yaml.safe_load(configlib.dump_yaml(run))) == run
    assert configlib.to_dict(run)["model"]["rope_theta"] == 1_000_000.0


def test_parse_overrides_and_merge():
    tree = configlib.parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"])
    assert tree == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="both a value and a section"):
        configlib.parse_overrides(["a=1", "a.b=2"])
    assert configlib.merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert configlib.merge({"n_layers": 6}, {"preset": "demo"}) == {"preset": "demo"}


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_presets_are_valid_and_independent(name):
    cfg = ModelConfig.preset(name)
    assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0 and cfg.head_dim % 2 == 0
    cfg.n_layers += 1                                      # a caller's edit never leaks into the preset table
    assert ModelConfig.preset(name).n_layers == cfg.n_layers - 1


def test_reference_backbone_presets():
    dream = ModelConfig.preset("dream-7b")                 # Qwen2.5-7B shape
    assert (dream.dim, dream.n_layers, dream.n_heads, dream.n_kv_heads, dream.hidden_dim) == (3584, 28, 28, 4, 18944)
    assert dream.qkv_bias and dream.logits == "shifted" and dream.weights_layout == "dream"
    assert dream.rope_theta == 1_000_000.0 and dream.head_dim == 128
    llada = ModelConfig.preset("llada-8b")
    assert (llada.dim, llada.n_layers, llada.n_heads, llada.n_kv_heads, llada.hidden_dim) == (4096, 32, 32, 32, 12288)
    assert not llada.qkv_bias and llada.logits == "aligned" and llada.weights_layout == "llada"
    assert llada.vocab_size == 126_464 and llada.rope_theta == 500_000.0
    with pytest.raises(ConfigError, match="must be even for RoPE"):
        ModelConfig(dim=12, n_heads=4, n_kv_heads=2)

"""The production chain as the prod overlays render it (infra/k8s/overlays/prod and prod-volume): tokenize (the
RayJob and the nightly RayCronJob) -> train from the Dream backbone. Read statically, like test_infra.py:

- every job's entrypoint parses with its command's own argument parser and its config (the YAML in configs/ plus
  the entrypoint's overrides) loads through the command's typed loader;
- the vocabulary the tokenize jobs will write, computed from their tokenizer configs without downloading anything
  (the text range from the size of Dream's tokenizer, which their text.path names; codebook sizes from the speech
  and image configs), is one vocabulary across the jobs and the one the train job expects: Dream's layout
  (model/vocab.py dream_vocab) within the dream-7b preset's rows, Dream's own special-token rows;
- the tokenize jobs read the tokenizer.json of the folder the train job starts from, and their GPU groups hold
  their actor pools; the train job's weights come from S3 (prod) or a read-only PVC mounted where
  train.init.path points (prod-volume).
"""
from __future__ import annotations

import dataclasses
import posixpath
from pathlib import Path

import pytest

from common import configlib
from model.config import ModelConfig
from model.tokenizers import (ImageTokenizerConfig, SpeechTokenizerConfig, TextTokenizerConfig, TokenizerConfig,
                              TokenizerSet)
from model.tokenizers.magvit2 import Magvit2Config
from model.tokenizers.speech import n_q_for_bandwidth
from model.vocab import (DREAM_TOKENIZER_SIZE, GLM4VOICE_CODEBOOK_SIZE, REUSED_SPECIALS, PromptFormat, Vocab,
                         dream_vocab, reference_layout)
from model.weights import backbone_tokenizer_uri
from pipelines.train.config import TrainConfig
from tests.helpers.kustomize import containers, render
from tests.integration.test_infra import cluster_spec, job_spec, quantity, shell_commands
from tokenize_jobs.config import TokenizeJobConfig

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
PROD = ("prod", "prod-volume")


@dataclasses.dataclass
class Job:
    overlay: str
    obj: dict
    module: str
    config: TokenizeJobConfig | TrainConfig

    @property
    def name(self) -> str:
        return f"{self.overlay}:{self.obj['kind']}/{self.obj['metadata']['name']}"


def load_job(overlay: str, obj: dict) -> Job:
    """The entrypoint's one `python -m` command, parsed by that command's parser; its config loaded as the
    command loads it."""
    (cmd,) = [c for c in shell_commands(job_spec(obj)["entrypoint"]) if c[:2] == ["python", "-m"]]
    module, argv = cmd[2], cmd[3:]
    if module == "pipelines.train":
        from pipelines.train.trainer import build_parser, resolve_config

        args = build_parser().parse_intermixed_args(argv)
        cfg = resolve_config(str(REPO / args.config), args.shards, args.run_dir, args.overrides)
    elif module in ("tokenize_jobs.passes", "tokenize_jobs.run"):
        from importlib import import_module

        args = import_module(module).build_parser().parse_args(argv)
        cfg = configlib.load(TokenizeJobConfig, str(REPO / args.config), args.overrides)
    else:
        raise AssertionError(f"{overlay}: a job runs {module}, which this test does not know")
    return Job(overlay, obj, module, cfg)


@pytest.fixture(scope="module", params=PROD)
def chain(request) -> dict[str, list[Job]]:
    objs = render(K8S / "overlays" / request.param)
    jobs = [load_job(request.param, o) for o in objs if o["kind"] in ("RayJob", "RayCronJob")]
    out = {"tokenize": [j for j in jobs if j.module.startswith("tokenize_jobs")],
           "train": [j for j in jobs if j.module == "pipelines.train"], "objects": objs}
    assert len(out["tokenize"]) == 2 and len(out["train"]) == 1, [j.name for j in jobs]
    return out


def planned_vocab(cfg: TokenizerConfig, text_tokenizer_size: int) -> Vocab:
    """The vocabulary a TokenizerSet of `cfg` has, computed from the config alone: ids only (no names or
    fingerprints), for a text tokenizer of `text_tokenizer_size` ids whose specials sit where Dream's do."""
    s, i = cfg.speech, cfg.image
    n_q, audio = ((1, GLM4VOICE_CODEBOOK_SIZE) if s.kind == "glm4voice"
                  else (s.codebooks or n_q_for_bandwidth(s.bandwidth), s.codebook_size))
    image = Magvit2Config.preset(i.magvit2_preset).codebook_size if i.kind == "magvit2" else i.levels ** i.channels
    assert cfg.prompt_format == PromptFormat.REFERENCE, "prod shards are in the reference chat format"
    return reference_layout(text_tokenizer_size, REUSED_SPECIALS["dream"], n_q=n_q, audio_codebook_size=audio,
                            image_codebook_size=image, speech_tokenizer="", image_tokenizer="", text_tokenizer="")


def ids_only(v: Vocab) -> Vocab:
    return dataclasses.replace(v, text_tokenizer="", text_fingerprint="", speech_tokenizer="", image_tokenizer="")


def test_planned_vocab_is_what_a_tokenizer_set_builds(tmp_path):
    # the formula above against the real thing, on a scaled-down Dream tokenizer (specials at Dream's relative ids)
    from tests.unit.test_reference_format import tiny_dream_tokenizer

    (tmp_path / "tokenizer.json").write_text(tiny_dream_tokenizer().to_str())
    cfg = TokenizerConfig(text=TextTokenizerConfig(kind="hf", path=str(tmp_path / "tokenizer.json")),
                          image=ImageTokenizerConfig(kind="pixel", size=2, channels=1, levels=4),
                          speech=SpeechTokenizerConfig(kind="glm4voice"), prompt_format=PromptFormat.REFERENCE)
    real = ids_only(TokenizerSet.prepare(cfg, str(tmp_path / "set")).vocab)
    small = {"mask": 262, "eos": 259, "im_start": 260, "im_end": 261}   # the tiny tokenizer's Dream specials
    expected = reference_layout(263, small, n_q=1, audio_codebook_size=GLM4VOICE_CODEBOOK_SIZE, image_codebook_size=4,
                                speech_tokenizer="", image_tokenizer="", text_tokenizer="")
    assert real == expected
    # and at Dream's size the formula gives model/vocab.py's own Dream vocabulary for the same codebooks
    prod = TokenizerConfig(text=TextTokenizerConfig(kind="hf", path="s3://x/tokenizer.json"),
                           image=ImageTokenizerConfig(kind="magvit2"), speech=SpeechTokenizerConfig(bandwidth=6.0),
                           prompt_format=PromptFormat.REFERENCE)
    assert planned_vocab(prod, DREAM_TOKENIZER_SIZE) == ids_only(dream_vocab(n_q=8))


def test_every_job_config_loads_through_its_typed_loader(chain):
    for job in chain["tokenize"]:
        assert isinstance(job.config, TokenizeJobConfig), job.name
    (train,) = chain["train"]
    assert isinstance(train.config, TrainConfig) and train.config.train.init.kind == "pretrained", train.name
    assert train.config.data.shards and all(s.startswith("s3://") for s in train.config.data.shards)
    assert train.config.run.run_dir.startswith("s3://"), train.name


def test_tokenize_vocabulary_is_the_one_training_expects(chain):
    (train,) = chain["train"]
    t = train.config
    vocabs = {}
    for job in chain["tokenize"]:
        text = job.config.tokenizers.text
        # Dream's tokenizer: the file the train job's backbone folder holds (same folder on S3 or on the volume)
        assert text.kind == "hf" and text.path.startswith("s3://"), f"{job.name}: text.path={text.path!r}"
        backbone_dir = t.train.init.path.rstrip("/")
        if backbone_dir.startswith("s3://"):
            assert text.path == backbone_tokenizer_uri(backbone_dir), f"{job.name} vs {train.name}"
        else:
            assert posixpath.basename(posixpath.dirname(text.path)) == Path(backbone_dir).name, \
                f"{job.name}: {text.path} is not the tokenizer of {backbone_dir}"
        vocabs[job.name] = planned_vocab(job.config.tokenizers, DREAM_TOKENIZER_SIZE)
        # every sample the job keeps fits one training row
        assert 0 < job.config.input.max_tokens <= t.data.seq_len <= t.model.seq_len, job.name
    vocab = next(iter(vocabs.values()))
    assert all(v == vocab for v in vocabs.values()), f"the tokenize jobs write different vocabularies: {vocabs}"
    speech = next(iter(chain["tokenize"])).config.tokenizers.speech
    assert vocab == ids_only(dream_vocab(n_q=speech.codebooks or n_q_for_bandwidth(speech.bandwidth)))
    preset = ModelConfig.preset("dream-7b")
    assert t.model == preset and t.model.weights_layout == t.train.init.layout == "dream"
    assert vocab.size <= t.model.vocab_size == 176_264, f"{vocab.size} ids do not fit the model's rows"
    # Dream's own trained rows serve as mask, eos and chat turns
    assert {k: vocab.special_ids()[k] for k in REUSED_SPECIALS["dream"]} == REUSED_SPECIALS["dream"]
    print(f"tokenize vocabulary: {vocab.size:,} ids (text {vocab.text_size:,}, speech {vocab.n_q} x "
          f"{vocab.audio_codebook_size:,} at {vocab.audio_offset:,}, image {vocab.image_codebook_size:,} at "
          f"{vocab.image_offset:,}) in the model's {t.model.vocab_size:,} rows")


def gpus(spec: dict) -> float:
    return sum(g["replicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                        .get("nvidia.com/gpu", 0)) for g in spec["workerGroupSpecs"])


def test_tokenize_gpu_groups_hold_the_actor_pools(chain):
    groups = []
    for job in chain["tokenize"]:
        r = job.config.ray
        assert gpus(cluster_spec(job.obj)) == r.actors * r.gpus_per_actor > 0, job.name
        groups.append([g for g in cluster_spec(job.obj)["workerGroupSpecs"] if g["groupName"] == "gpu"])
    assert groups[0] == groups[1], "the RayJob's and the RayCronJob's GPU groups differ"


def _mounts(spec: dict) -> dict[str, list[tuple[str, dict, dict]]]:
    """pod group -> (mountPath, volumeMount, volume) of the Ray container's mounts."""
    out = {}
    for group, g in [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]:
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        out[group] = [(m["mountPath"], m, volumes[m["name"]]) for m in pod["containers"][0].get("volumeMounts", [])]
    return out


def test_train_weights_come_from_s3_or_a_mounted_read_only_volume(chain):
    (train,) = chain["train"]
    path, spec = train.config.train.init.path, cluster_spec(train.obj)
    if path.startswith("s3://"):
        for c in containers(spec):   # driver and workers read it with the S3 credentials
            assert {"secretRef": {"name": "omnidiff-s3"}} in c.get("envFrom", []), train.name
        return
    pvcs = {o["metadata"]["name"]: o for o in chain["objects"] if o["kind"] == "PersistentVolumeClaim"}
    for group, mounts in _mounts(spec).items():   # the driver checks tokenizer.json, every rank reads weights
        holding = [(m, v) for mount_path, m, v in mounts if path.startswith(mount_path.rstrip("/") + "/")]
        assert len(holding) == 1, f"{train.name} {group}: nothing mounted at {path}"
        m, v = holding[0]
        claim = v["persistentVolumeClaim"]["claimName"]
        assert m.get("readOnly") and v["persistentVolumeClaim"].get("readOnly"), f"{train.name} {group}"
        assert claim in pvcs and pvcs[claim]["spec"]["accessModes"] == ["ReadOnlyMany"], claim

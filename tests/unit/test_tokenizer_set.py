import json
import socket
import subprocess
import sys

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from common import configlib
from common.configlib import ConfigError
from model.tokenizers import TokenizerConfig, TokenizerMismatch, TokenizerSet, default_tokenizer_config
from model.tokenizers.speech import EncodecTokenizer
from model.tokenizers.text import HFTextTokenizer
from model.vocab import Vocab

DIGITS = "zero one two three four five six seven eight nine".split()
TEXTS = [f"Generate an image of the digit {w}." for w in DIGITS] + [f"The digit is {w}." for w in DIGITS]


def wavs(n: int = 4, seconds: float = 0.25) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(24_000 * seconds)) / 24_000
    return [(0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
            for i in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[TokenizerSet, str]:
    out = str(tmp_path_factory.mktemp("out") / "tokenizers")
    return TokenizerSet.prepare(default_tokenizer_config(), out, texts=TEXTS, wavs=wavs()), out


def test_demo_config_and_vocab(prepared):
    s, out = prepared
    v = s.vocab
    assert isinstance(v, Vocab)
    assert v.text_size == s.text.size and 256 < v.text_size <= 512
    assert (v.n_q, v.audio_codebook_size, v.image_codebook_size) == (2, 1024, 17)
    assert v.text_tokenizer == "bpe512" and v.text_fingerprint == s.text.fingerprint()
    assert v.image_tokenizer == "pixel-8x8x1-17" and v.speech_tokenizer == "encodec_24khz-offline@1.5kbps"
    assert set(s.fingerprints()) == {"text", "image", "speech"}


def test_artifacts_layout(prepared):
    s, out = prepared
    from pathlib import Path

    files = {p.name for p in Path(out).iterdir()}
    assert {"tokenizers.json", "vocab.json", "text.json", "encodec.safetensors"} <= files
    record = json.loads((Path(out) / "tokenizers.json").read_text())
    assert record["fingerprints"] == s.fingerprints()
    assert record["config"] == configlib.to_dict(default_tokenizer_config())
    assert Vocab.from_json((Path(out) / "vocab.json").read_text()) == s.vocab
    assert TokenizerSet.read_vocab(out) == s.vocab


def test_load_restores_identical_tokenizers(prepared):
    s, out = prepared
    t = TokenizerSet.load(out)
    assert t.fingerprints() == s.fingerprints() and t.vocab == s.vocab
    assert t.config == s.config
    for text in TEXTS + ["unseen 🙂"]:
        assert t.text.encode(text) == s.text.encode(text)
    probe = wavs(1, 0.4)[0]
    np.testing.assert_array_equal(t.speech.encode(probe), s.speech.encode(probe))
    img = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
    np.testing.assert_array_equal(t.image.encode(img), s.image.encode(img))


def test_lazy_media_load_builds_image_and_speech_on_first_use(prepared, monkeypatch):
    s, out = prepared
    import model.tokenizers as tokenizers

    built = []
    for name in ("_build_image", "_build_speech"):
        def counted(*args, _real=getattr(tokenizers, name), _name=name):
            built.append(_name)
            return _real(*args)
        monkeypatch.setattr(tokenizers, name, counted)
    t = TokenizerSet.load(out, lazy_media=True)
    assert t.vocab == s.vocab and built == []   # the vocabulary comes whole from the saved one
    assert t.text.encode(TEXTS[0]) == s.text.encode(TEXTS[0]) and built == []
    probe = wavs(1, 0.4)[0]
    np.testing.assert_array_equal(t.speech.encode(probe), s.speech.encode(probe))
    assert built == ["_build_speech"]
    t.speech.encode(probe)
    img = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
    np.testing.assert_array_equal(t.image.encode(img), s.image.encode(img))
    assert built == ["_build_speech", "_build_image"]   # each built once
    assert t.fingerprints() == s.fingerprints()


def test_lazy_media_load_checks_a_tokenizer_when_it_is_built(prepared, tmp_path):
    s, _ = prepared
    out = str(tmp_path / "tok")
    s.save(out)
    other = EncodecTokenizer.fit_offline(wavs(2, 0.3)[::-1], fit_samples=2, seed=1)
    other.save_offline(f"{out}/encodec.safetensors")
    t = TokenizerSet.load(out, lazy_media=True)    # text and vocabulary check out: a text-only step goes on
    assert t.text.encode(TEXTS[0]) == s.text.encode(TEXTS[0])
    with pytest.raises(TokenizerMismatch, match="speech tokenizer loaded from .* differs"):
        t.speech
    with pytest.raises(TokenizerMismatch, match="speech: recorded"):
        TokenizerSet.load(out)


def test_tokenizer_configs_and_a_lazy_text_load_need_no_torch(prepared):
    """Validating configs and tokenizing text import no torch: EnCodec's code layout lives apart from the
    model (model/tokenizers/encodec_spec.py), and EnCodec is built only for speech."""
    s, out = prepared
    code = ("import sys\n"
            "from common import configlib\n"
            "from model.tokenizers import TokenizerConfig, TokenizerSet\n"
            "cfg = configlib.load(TokenizerConfig, overrides=['preset=demo', 'speech.bandwidth=3.0'])\n"
            f"t = TokenizerSet.load({out!r}, lazy_media=True)\n"
            f"print(json.dumps([t.text.encode({TEXTS[0]!r}), t.vocab.fingerprint()]))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == [s.text.encode(TEXTS[0]), s.vocab.fingerprint()]


def test_prepare_again_loads_without_refitting(prepared, monkeypatch):
    s, out = prepared

    def no_fit(*a, **k):
        raise AssertionError("prepare refitted an existing set")

    monkeypatch.setattr(EncodecTokenizer, "fit_offline", no_fit)
    monkeypatch.setattr(HFTextTokenizer, "train_bpe", no_fit)
    again = TokenizerSet.prepare(default_tokenizer_config(), out, texts=["other corpus"], wavs=[])
    assert again.fingerprints() == s.fingerprints()
    # input guards may differ: they never change the codes of an accepted input
    guarded = configlib.load(TokenizerConfig, overrides=["preset=demo", "image.max_pixels=1000",
                                                         "speech.max_seconds=5"])
    g = TokenizerSet.prepare(guarded, out)
    assert g.image.max_pixels == 1000 and g.speech.max_seconds == 5.0


@pytest.mark.parametrize("override,key", [("speech.bandwidth=3.0", "speech.bandwidth"),
                                          ("speech.codebook_size=256", "speech.codebook_size"),
                                          ("text.vocab_size=400", "text.vocab_size"),
                                          ("image.levels=16", "image.levels")])
def test_prepare_with_other_config_names_the_keys(prepared, override, key):
    _, out = prepared
    cfg = configlib.load(TokenizerConfig, overrides=["preset=demo", override])
    with pytest.raises(TokenizerMismatch) as e:
        TokenizerSet.prepare(cfg, out, texts=TEXTS, wavs=wavs())
    assert key in str(e.value) and "tokenizers.json" in str(e.value)


def test_tampered_file_is_refused(prepared, tmp_path):
    s, _ = prepared
    out = str(tmp_path / "tok")
    s.save(out)
    other = HFTextTokenizer.train_bpe(["a different corpus"], 300)
    other.save(f"{out}/text.json")
    with pytest.raises(TokenizerMismatch, match="text: recorded"):
        TokenizerSet.load(out)


def test_hf_text_tokenizer_reserves_backbone_rows(prepared, tmp_path):
    s, _ = prepared
    backbone = tmp_path / "backbone" / "tokenizer.json"
    backbone.parent.mkdir()
    s.text.save(str(backbone))
    cfg = configlib.load(TokenizerConfig, overrides=["preset=demo", "text.kind=hf", f"text.path={backbone}",
                                                     "text.text_size=1000"])
    text = HFTextTokenizer.from_file(cfg.text.path, cfg.text.text_size)
    hf_set = TokenizerSet(cfg, text, s.image, s.speech)
    out = str(tmp_path / "tok")
    hf_set.save(out)
    backbone.unlink()  # later steps read the copy beside the shards, not the original path
    loaded = TokenizerSet.load(out)
    assert loaded.vocab.text_size == 1000 and loaded.vocab.special_offset == 1000
    assert loaded.text.encode("the digit seven") == s.text.encode("the digit seven")


def test_backbone_special_ids_are_reused(prepared, tmp_path):
    """text.reuse_specials=dream: the vocabulary puts mask/eos/chat turns on Dream's trained rows (saved and
    reloaded as such), and an unknown backbone name is a config error."""
    from model.vocab import dream_vocab

    s, _ = prepared
    backbone = tmp_path / "tokenizer.json"
    s.text.save(str(backbone))
    cfg = configlib.load(TokenizerConfig, overrides=["preset=demo", "text.kind=hf", f"text.path={backbone}",
                                                     "text.text_size=152064", "text.reuse_specials=dream"])
    dream_set = TokenizerSet(cfg, HFTextTokenizer.from_file(cfg.text.path, cfg.text.text_size), s.image, s.speech)
    out = str(tmp_path / "tok")
    dream_set.save(out)
    vocab = TokenizerSet.load(out).vocab
    for name in ("mask", "eos", "im_start", "im_end"):
        assert vocab.special_id(name) == dream_vocab().special_id(name) < vocab.text_size
    assert vocab.boi_id >= vocab.special_offset      # specials Dream lacks keep their own ids
    with pytest.raises(ConfigError, match="reuse_specials"):
        configlib.load(TokenizerConfig, overrides=["text.reuse_specials=gpt2"])


def test_config_errors():
    with pytest.raises(ConfigError, match="speech.bandwidth"):
        configlib.load(TokenizerConfig, overrides=["speech.bandwidth=2"])
    with pytest.raises(ConfigError, match="text.path"):
        configlib.load(TokenizerConfig, overrides=["text.kind=hf"])
    with pytest.raises(ConfigError, match="image.channels"):
        configlib.load(TokenizerConfig, overrides=["image.channels=2"])
    with pytest.raises(ConfigError, match="unknown key"):
        configlib.load(TokenizerConfig, overrides=["speech.bandwdith=3"])
    with pytest.raises(ConfigError, match="needs speech.weights=offline"):
        configlib.load(TokenizerConfig, overrides=["speech.codebook_size=256", "speech.weights=pretrained"])
    with pytest.raises(ConfigError, match="has 2 codebooks"):
        configlib.load(TokenizerConfig, overrides=["speech.codebooks=3"])
    with pytest.raises(ConfigError, match="power of two"):
        configlib.load(TokenizerConfig, overrides=["speech.codebook_size=100"])
    assert TokenizerConfig.preset("demo") == default_tokenizer_config()


def test_prepare_needs_corpus_and_load_needs_a_set(tmp_path):
    with pytest.raises(ValueError, match="needs a text corpus"):
        TokenizerSet.prepare(default_tokenizer_config(), str(tmp_path / "a"), texts=[], wavs=wavs(1))
    with pytest.raises(ValueError, match="needs speech"):
        TokenizerSet.prepare(default_tokenizer_config(), str(tmp_path / "b"), texts=TEXTS, wavs=[])
    with pytest.raises(FileNotFoundError, match="tokenize"):
        TokenizerSet.load(str(tmp_path / "nothing"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
    yield "s3://bucket"
    server.stop()


def test_s3_round_trip(prepared, s3):
    s, _ = prepared
    out = f"{s3}/run/tokenizers"
    s.save(out)
    t = TokenizerSet.load(out)
    assert t.fingerprints() == s.fingerprints() and t.vocab == s.vocab
    probe = wavs(1, 0.3)[0]
    np.testing.assert_array_equal(t.speech.encode(probe), s.speech.encode(probe))
    with pytest.raises(TokenizerMismatch, match="speech.bandwidth"):
        TokenizerSet.prepare(configlib.load(TokenizerConfig, overrides=["preset=demo", "speech.bandwidth=3"]), out)

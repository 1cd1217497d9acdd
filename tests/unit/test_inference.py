"""pipelines/infer/predictor.py (export loading, prompts, canvases, decoding), the `sample` CLI and the eval metric
wiring, on a debug export with random weights (tests/helpers/export.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from common.configlib import ConfigError
from model.tasks import IMAGE_PLACEHOLDER, TASKS
from model.tokenizers.base import BadInput
from model.vocab import Modality, VocabMismatch
from pipelines.eval import evaluate
from pipelines.infer import sample
from pipelines.infer.predictor import (
    Predictor,
    Request,
    load_export,
    request_from_line,
    spoken_text,
)
from pipelines.infer.presets import SamplerPresets, load_presets
from tests.helpers.export import demo_lines, write_debug_export, write_media

FAST = ["steps=2", "batch_size=4"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return write_debug_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def loaded(export):
    return load_export(str(export), device="cpu")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    return write_media(tmp_path_factory.mktemp("media"))


def predictor(loaded, *overrides: str, preset: str = "project") -> Predictor:
    return Predictor(loaded, load_presets(preset, None, [*FAST, *overrides]))


# ---- presets ----------------------------------------------------------------------------------------------

def test_presets_overrides_bare_and_per_task():
    p = load_presets("project", None, ["steps=7", "tts.length_ratio=60", "seed=3"], tasks=["i2t", "tts"])
    assert p.i2t.steps == 7 and p.tts.steps == 7 and p.t2i.steps == 256    # bare key: only the listed tasks
    assert p.tts.length_ratio == 60 and p.seed == 3
    ref = SamplerPresets()
    assert (ref.t2i.steps, ref.t2i.position_penalty, ref.vqa.length, ref.svqa.length) == (256, 2.0, 64, 128)
    assert (ref.asr.length_ratio, ref.asr.steps_ratio, ref.tts.length_ratio) == (0.2, 0.5, 3.5)
    assert load_presets("demo").tts.length_ratio > 10 * ref.tts.length_ratio
    with pytest.raises(ConfigError, match="Sampler keys"):
        load_presets("reference", None, ["stepz=3"])
    with pytest.raises(ConfigError, match="temperature"):
        load_presets("reference", None, ["temperature=-1"])
    with pytest.raises(ConfigError, match="schedule"):
        load_presets("project", None, ["schedule=linear"])
    assert load_presets() == SamplerPresets() == SamplerPresets.preset("project")   # the default preset


def test_reference_preset_has_the_reference_scripts_settings():
    """tools/inference.py of the reference: generate(temperature=0.0, top_p=0.9) with top_k=50 from the
    generation config; s2i 260/260 entropy-penalty 1.5 position 2.0 cfg 2.0, t2i the same with 1.2 and no cfg,
    svqa 128/128 entropy-penalty 1.2 with <boa> at 20%, vqa 64/64 entropy, asr and tts 50/25 entropy."""
    r = load_presets("reference")
    for task in TASKS:
        s = r.for_task(task)
        assert (s.temperature, s.top_p, s.top_k, s.filter_greedy, s.schedule, s.position_penalty_on, s.eps,
                s.ties, s.alg_temp) == (0.0, 0.9, 50, True, "dream", "logits", 1e-3, "first", 0.0), task
    key = lambda s: (s.length, s.steps, s.alg, s.repetition_penalty, s.position_penalty, s.cfg_scale, s.uncond)
    assert key(r.s2i) == (0, 260, "entropy-penalty", 1.5, 2.0, 2.0, "empty_user")
    assert key(r.t2i) == (0, 260, "entropy-penalty", 1.2, 2.0, 0.0, "random_text")
    assert key(r.svqa) == (128, 128, "entropy-penalty", 1.2, 1.0, 0.0, "masked") and r.svqa.speech_answer
    assert r.svqa.boa_fraction == 0.2 and key(r.sqa) == key(r.svqa)
    assert key(r.vqa) == (64, 64, "entropy", 1.0, 1.0, 0.0, "masked")
    assert key(r.asr) == key(r.tts) == (50, 25, "entropy", 1.0, 1.0, 0.0, "masked")


# ---- export loading ---------------------------------------------------------------------------------------

def test_load_export_checks_files_and_vocab(export, loaded, tmp_path):
    assert loaded.vocab == loaded.tokenizers.vocab and loaded.device.type == "cpu"
    assert loaded.model.vocab_size == loaded.vocab.size and not loaded.model.training
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_export(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_export(str(broken))
    other = tmp_path / "other"
    shutil.copytree(export, other)
    v = json.loads((other / "vocab.json").read_text())
    v["n_q"], v["layout"]["size"] = 4, v["layout"]["size"] + 2 * 1024
    (other / "vocab.json").write_text(json.dumps(v))
    with pytest.raises(VocabMismatch, match="n_q"):
        load_export(str(other))


def test_export_names_its_mlflow_run_and_the_store_is_found(tmp_path, export, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracked = write_debug_export(run_dir / "export", mlflow_run_id="abc", tokenizers_from=export / "tokenizers")
    loaded = load_export(str(tracked), device="cpu")
    assert loaded.config.mlflow_run_id == "abc" and loaded.config.run_name == "debug"
    assert loaded.model_config.vocab_size == loaded.vocab.size
    assert loaded.mlflow_run() is None                      # no store beside the export, none in the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert loaded.mlflow_run() == ("http://tracking:5000", "abc")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (run_dir / "mlflow.db").write_bytes(b"")
    assert loaded.mlflow_run() == (f"sqlite:///{(run_dir / 'mlflow.db').resolve()}", "abc")
    assert loaded.mlflow_run("http://x") == ("http://x", "abc")
    assert load_export(str(export), device="cpu").mlflow_run("http://x") is None   # no run recorded


# ---- canvases ---------------------------------------------------------------------------------------------

def test_image_canvas_has_training_layout(loaded):
    req = Request("t2i", text="a handwritten seven")
    prep = predictor(loaded, "steps=1000").prepare(req)
    v, n = loaded.vocab, loaded.tokenizers.image.tokens_per_image
    assert prep.prompt[-1] == v.boi_id and prep.prompt[-3:-1].tolist() == [v.im_start_id, v.role_id("assistant")]
    assert prep.canvas.length == n + 2 and prep.canvas.fixed == ((n, v.eoi_id), (n + 1, v.im_end_id))
    assert prep.canvas.steps == n               # capped at the positions to fill
    out = predictor(loaded, "t2i.temperature=1").predict([req])[0]
    lo, hi = v.image_range()
    assert ((out.canvas[:n] >= lo) & (out.canvas[:n] < hi)).all()
    assert out.canvas[n:].tolist() == [v.eoi_id, v.im_end_id]
    assert out.image.shape == (8, 8, 1) and out.image.dtype == np.uint8


def test_speech_canvas_lengths_and_allowed_ids(loaded):
    p = predictor(loaded, "tts.length_ratio=5", "tts.min_length=3", "tts.max_length=16", "tts.temperature=1")
    v = loaded.vocab
    short = p.prepare(Request("tts", text="seven"))
    n_text = len(loaded.tokenizers.text.encode("seven"))
    assert short.canvas.length == max(4, -(-5 * n_text // 2) * 2) and short.canvas.length % v.n_q == 0
    long = p.prepare(Request("tts", text="seven " * 40))
    assert long.canvas.length == 16                                          # max_length
    assert short.canvas.steps == -(-short.canvas.length // 2)                # steps = length / 2
    allowed = p.allowed(long.canvas)
    assert allowed.shape == (16, v.size)
    for i in range(16):
        lo, hi = v.audio_range(i % v.n_q)
        row = allowed[i].nonzero().flatten().tolist()
        assert set(row) == set(range(lo, hi)) | {v.eoa_id, v.im_end_id, v.eos_id}
    out = p.run([long])[0]
    assert all(allowed[i, t] for i, t in enumerate(out.canvas.tolist()))
    assert out.audio_codes.shape[0] == v.n_q and out.wav.shape == (out.audio_codes.shape[1] * 320,)


def test_asr_length_follows_speech_tokens(loaded, media):
    p = predictor(loaded, "asr.length_ratio=0.5", "asr.min_length=1")
    prep = p.prepare(Request("asr", audios=[str(media["seven.wav"])]))
    lo, hi = loaded.vocab.audio_range()
    n_speech = int(((prep.prompt >= lo) & (prep.prompt < hi)).sum())
    assert n_speech > 0 and prep.canvas.length == -(-n_speech // 2)


def test_spoken_vqa_speech_answer_preinfills_boa(loaded, media):
    p = predictor(loaded, "svqa.speech_answer=true", "svqa.length=40")
    prep = p.prepare(Request("svqa", images=[str(media["seven.png"])], audios=[str(media["question.wav"])]))
    v = loaded.vocab
    assert prep.canvas.layout == (Modality.TEXT, Modality.AUDIO) and prep.canvas.fixed == ((8, v.boa_id),)
    out = p.run([prep])[0]
    assert out.canvas[8] == v.boa_id and isinstance(out.text, str) and out.audio_codes.shape[0] == v.n_q
    assert v.allowed_ids(Modality.TEXT)[torch.from_numpy(out.canvas[:8])].all()


def test_speech_to_image_chain_writes_the_transcript_then_the_image(loaded, media):
    """s2i.transcript=1: one canvas, <im_start><assistant> | word <boi> codes <eoi> <im_end>, the word first."""
    p = predictor(loaded, "s2i.transcript=1", "s2i.steps=4", "s2i.temperature=1", "s2i.alg=random")
    prep = p.prepare(Request("s2i", audios=[str(media["seven.wav"])]))
    v, n = loaded.vocab, loaded.tokenizers.image.tokens_per_image
    c = prep.canvas
    assert prep.prompt[-2:].tolist() == [v.im_start_id, v.role_id("assistant")]   # no <boi>: the text comes first
    assert (c.layout, c.length, c.split, c.steps) == ((Modality.TEXT, Modality.IMAGE), n + 4, 1, 1 + 4)
    assert c.fixed == ((1, v.boi_id), (n + 2, v.eoi_id), (n + 3, v.im_end_id))
    assert p.blocks(c) == [(1, 1, 0.0, 0.0), (n + 3, 4, None, None)]   # the transcript by argmax, unguided
    allowed = p.allowed(c)
    assert set(allowed[0].nonzero().flatten().tolist()) == set(range(v.text_size))   # a text token, not a stop
    lo, hi = v.image_range()
    assert set(allowed[2].nonzero().flatten().tolist()) == set(range(lo, hi))
    out = p.run([prep])[0]
    assert out.canvas[0] < v.text_size and out.canvas[1] == v.boi_id
    assert ((out.canvas[2:n + 2] >= lo) & (out.canvas[2:n + 2] < hi)).all()
    assert out.text == p.decode_text(out.canvas[:1]) and out.image.shape == (8, 8, 1)
    # the image is the canvas after <boi>: the same codes the tokenizer decodes
    drawn = loaded.tokenizers.image.decode(v.image_codes(out.canvas[2:n + 2])[None])[0]   # (1, N) -> (H, W, C)
    np.testing.assert_array_equal(out.image, drawn)
    plain = predictor(loaded).prepare(Request("s2i", audios=[str(media["seven.wav"])]))
    assert plain.canvas.layout == (Modality.IMAGE,)


def test_block_length_and_seq_len_limits(loaded):
    p = predictor(loaded, "text.length=10", "text.block_length=4", "text.steps=5")
    c = p.prepare(Request("text", text="hi")).canvas
    assert c.length == 12 and c.steps % 3 == 0                     # rounded to whole blocks
    with pytest.raises(BadInput, match="seq_len"):
        predictor(loaded, "text.length=100000").prepare(Request("text", text="hi"))


def test_image_blocks_and_the_fast_presets(loaded, media):
    """block_length on an image canvas (codes + <eoi><im_end>, rarely a multiple): blocks of that length, the last
    shorter, steps in proportion; the fast preset decodes every task's canvas, with the cache and threshold on
    image canvases, the threshold alone on text answers and speech answers as in its base preset."""
    n = loaded.tokenizers.image.tokens_per_image
    p = predictor(loaded, "t2i.block_length=32", "t2i.steps=16")
    c = p.prepare(Request("t2i", text="seven")).canvas
    blocks = p.blocks(c)
    assert [b.length for b in blocks] == [32] * ((n + 2) // 32) + [(n + 2) % 32] * bool((n + 2) % 32)
    assert sum(b.steps for b in blocks) == 16 and min(b.steps for b in blocks) >= 1
    fast = predictor(loaded, "t2i.steps=8", "tts.max_length=64", preset="demo-fast")
    assert fast.presets.t2i.kv_cache == "dual" and fast.presets.vqa.unmask_threshold == 0.9
    assert fast.presets.vqa.kv_cache == "off" and fast.presets.s2i.block_length == 32
    tts = fast.presets.tts                                                          # speech answers: unchanged
    assert (tts.kv_cache, tts.unmask_threshold, tts.block_length) == ("off", 0.0, 0)
    for req in (Request("t2i", text="seven"), Request("tts", text="seven"),
                Request("i2t", images=[str(media["seven.png"])])):
        out = fast.run([fast.prepare(req)])[0]
        assert (out.canvas != loaded.vocab.mask_id).all(), req.task


def test_decoders_cut_at_stop_tokens(loaded):
    p = predictor(loaded)
    v, tok = loaded.vocab, loaded.tokenizers.text
    ids = np.array(tok.encode("seven") + [v.im_end_id] + tok.encode("junk") + [v.eos_id], dtype=np.int64)
    assert p.decode_text(ids) == "seven"
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    flat = v.audio_ids(codes)
    cut = np.concatenate([flat[:5], [v.eoa_id], flat[:2]])               # 5 codes = 2 whole frames + 1
    assert p.audio_codes(cut).tolist() == [[1, 2], [4, 5]]
    assert p.audio_codes(np.array([v.eoa_id])).shape == (v.n_q, 0)


def test_batched_rows_match_single_rows(loaded, media):
    """Prompts of different lengths share a batch through left padding; results equal one-at-a-time runs."""
    p = predictor(loaded, "i2t.length=6", "i2t.steps=3")
    reqs = [Request("i2t", images=[str(media["seven.png"])]),
            Request("i2t", messages=[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nWhat digit is this one?"}],
                    images=[str(media["three.png"])])]
    together = p.predict(reqs)
    alone = [p.predict([r])[0] for r in reqs]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.canvas, b.canvas)


@pytest.mark.parametrize("preset", ["demo", "project"])
def test_demo_and_project_presets_sample_what_they_sampled_before(loaded, media, monkeypatch, preset):
    """Every new sampler option is off in these presets: the predictor's canvases are those of the sampler
    before the options existed (tests/helpers/sampling_v1.py), for every task of the demo's lines."""
    from pipelines.infer import predictor as predictor_module
    from tests.helpers import sampling_v1

    p = predictor(loaded, "steps=3", "tts.max_length=24", "svqa.length=8", "sqa.length=10", preset=preset)
    base = str(media["seven.png"].parent.parent)
    prepared = [p.prepare(request_from_line(line, base)[0]) for line in demo_lines()]
    now = p.run(prepared, decode_audio=False)

    def before(model, ids, **kw):
        new = {k: kw.pop(k) for k in ("schedule", "eps", "alg_temp", "ties", "top_k", "filter_greedy",
                                      "position_penalty_on", "kv_cache", "unmask_threshold", "unmask_floor")}
        assert new == {"schedule": "even", "eps": 1e-3, "alg_temp": 0.0, "ties": "topk", "top_k": None,
                       "filter_greedy": False, "position_penalty_on": "confidence", "kv_cache": "off",
                       "unmask_threshold": None, "unmask_floor": "one"} and kw["alg"] in sampling_v1.ALGS
        return sampling_v1.generate(model, ids, **kw)

    monkeypatch.setattr(predictor_module, "generate", before)
    then = p.run(prepared, decode_audio=False)
    assert [o.task for o in now] == ["t2i", "t2i", "i2t", "asr", "tts", "s2i", "svqa", "sqa"]
    for a, b in zip(now, then):
        np.testing.assert_array_equal(a.canvas, b.canvas, err_msg=a.task)


class Recorder(torch.nn.Module):
    """The model, with the inputs of every call kept."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, *args, **kwargs):
        self.calls.append(x.clone())
        return self.model(x, *args, **kwargs)


def test_guidance_unconditional_prompts_per_task(loaded, media):
    """s2i: the system prompt and an empty user turn; t2i: the instruction with random text ids in place of the
    caption (as many); both end like the prompt, and guidance's rows see them."""
    import dataclasses

    v = loaded.vocab
    p = predictor(loaded, "s2i.cfg_scale=2", "s2i.uncond=empty_user", "t2i.cfg_scale=2", "t2i.uncond=random_text",
                  "i2t.cfg_scale=2")
    s2i = p.prepare(Request("s2i", audios=[str(media["seven.wav"])]))
    assert s2i.uncond.tolist() == [v.im_start_id, v.role_id("user"), v.im_end_id, v.im_start_id,
                                   v.role_id("assistant"), v.boi_id]
    t2i = p.prepare(Request("t2i", text="a handwritten seven"))
    n = len(loaded.tokenizers.text.encode("a handwritten seven"))
    head = len(loaded.tokenizers.text.encode("Generate an image of ")) + 2          # <im_start><user> instruction
    assert len(t2i.uncond) == len(t2i.prompt) and t2i.uncond[-4:].tolist() == t2i.prompt[-4:].tolist()
    assert t2i.uncond[:head].tolist() == t2i.prompt[:head].tolist()
    noise = t2i.uncond[head:head + n]
    assert (noise < v.text_size).all() and len(set(noise.tolist())) == n and noise.tolist() != \
        t2i.prompt[head:head + n].tolist()
    assert p.prepare(Request("i2t", images=[str(media["seven.png"])])).uncond is None   # "masked": generate's
    rec = Recorder(loaded.model)
    guided = Predictor(dataclasses.replace(loaded, model=rec), p.presets)
    guided.run([s2i])
    x = rec.calls[0]                                                       # (2, P + G): cond row, uncond row
    assert x.shape[0] == 2 and x[1, len(s2i.prompt) - len(s2i.uncond): len(s2i.prompt)].tolist() == \
        s2i.uncond.tolist()
    assert (x[1, : len(s2i.prompt) - len(s2i.uncond)] == v.pad_id).all()    # left padding


def test_spoken_qa_line_answers_in_text_then_speech(loaded, media):
    """The reference's SQA line (spoken question, answer text then speech) is an sqa request whose reference is
    the answer's text; sqa samples text, <boa> at 20% of the canvas, then speech."""
    line = demo_lines()[-1]
    req, ref = request_from_line(line, str(media["seven.png"].parent.parent))
    assert (req.task, ref.text, ref.audios, req.audios) == ("sqa", "seven", ["audio/seven.wav"],
                                                            ["audio/question.wav"])
    for preset in ("project", "reference"):
        p = predictor(loaded, "sqa.length=20", "sqa.steps=10", preset=preset)
        prep = p.prepare(req)
        v = loaded.vocab
        assert prep.canvas.layout == (Modality.TEXT, Modality.AUDIO) and prep.canvas.fixed == ((4, v.boa_id),)
        out = p.run([prep])[0]
        assert out.canvas[4] == v.boa_id and isinstance(out.text, str) and out.audio_codes.shape[0] == v.n_q


def test_reference_preset_samples_every_task(loaded, media):
    """The reference preset (Dream schedule, top-k 50 / top-p 0.9 at temperature 0, penalties on logits,
    entropy-penalty, s2i guidance with its empty-user prompt) through the predictor, every task."""
    p = predictor(loaded, "t2i.steps=8", "s2i.steps=8", "svqa.length=10", "sqa.length=10", "vqa.length=6",
                  "asr.length=6", "tts.length=8", "i2t.length=6", preset="reference")
    base = str(media["seven.png"].parent.parent)
    prepared = [p.prepare(request_from_line(line, base)[0]) for line in demo_lines()]
    assert prepared[5].uncond is not None and prepared[0].uncond is None        # s2i guided, t2i not
    outs = p.run(prepared, decode_audio=False)
    assert all((o.canvas != loaded.vocab.mask_id).all() for o in outs)
    assert outs[0].image is not None and outs[4].audio_codes is not None and outs[7].text is not None


# ---- requests ---------------------------------------------------------------------------------------------

def test_request_from_line_splits_prompt_and_reference():
    lines = demo_lines()
    req, ref = request_from_line(lines[5], "/data", id=9)            # s2i: answer image is the reference
    assert req.task == "s2i" and req.audios == ["audio/seven.wav"] and req.images == [] and req.id == 9
    assert ref.images == ["images/seven.png"] and ref.label == 7 and ref.text is None
    chain = json.loads(json.dumps(lines[5]))
    chain["messages"][-1]["content"] = "seven" + IMAGE_PLACEHOLDER               # transcript, then the image
    req, ref = request_from_line(chain, "/data")
    assert req.task == "s2i" and ref.images == ["images/seven.png"] and ref.text == "seven"
    req, ref = request_from_line(lines[2], "")                       # i2t: prompt image, text reference
    assert req.images == ["images/seven.png"] and ref.text == "seven" and req.messages[-1]["role"] == "user"
    req, _ = request_from_line({"messages": [{"role": "user", "content": "<|audio|>"}], "audios": ["a.wav"]})
    assert req.task == "asr"
    for bad, reason in [([1], "bad_line"), ({"messages": []}, "bad_line"),
                        ({"messages": [{"role": "user", "content": "x"}], "task": "nope"}, "unknown_task"),
                        ({"messages": [{"role": "assistant", "content": "x"}]}, "bad_line"),
                        ({"messages": [{"role": "user", "content": "x"}], "images": [3]}, "bad_line")]:
        with pytest.raises(BadInput) as e:
            request_from_line(bad)
        assert e.value.reason == reason


def test_spoken_text_strips_the_template():
    from model.prompts import TaskTemplates

    t = TaskTemplates().tts
    assert spoken_text(t, "Read this aloud: seven") == "seven"
    assert spoken_text(t, "say seven") == "say seven"


def test_missing_and_unreadable_inputs(loaded, media, tmp_path):
    p = predictor(loaded)
    with pytest.raises(BadInput) as e:
        p.prepare(Request("i2t"))
    assert e.value.reason == "missing_input" and "1 image" in str(e.value)
    with pytest.raises(BadInput) as e:
        p.prepare(Request("asr", audios=[str(tmp_path / "none.wav")]))
    assert e.value.reason == "missing_file" and "none.wav" in str(e.value)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BadInput) as e:
        p.prepare(Request("i2t", images=[str(tmp_path / "bad.png")]))
    assert e.value.reason == "corrupt_image"


# ---- the sample CLI ---------------------------------------------------------------------------------------

INPUTS = {"t2i": ["--text", "a handwritten seven"], "i2t": ["--image", "{png}"], "vqa": ["--image", "{png}",
          "--text", "which digit?"], "asr": ["--audio", "{wav}"], "tts": ["--text", "seven"],
          "s2i": ["--audio", "{wav}"], "svqa": ["--image", "{png}", "--audio", "{wav}"], "text": ["--text", "hi"],
          "sqa": ["--audio", "{wav}"]}
FILES = {"t2i": ["image.png"], "s2i": ["image.png"], "tts": ["speech.wav"], "sqa": ["answer.txt", "speech.wav"]}


@pytest.fixture
def cached_sample(monkeypatch, loaded):
    """The CLI builds its Predictor from the module's loaded export (loading is tested above)."""
    monkeypatch.setattr(sample.Predictor, "from_export",
                        classmethod(lambda cls, uri, device=None, presets=None, dtype="auto": cls(loaded, presets)))


@pytest.mark.parametrize("task", TASKS)
def test_sample_each_task_writes_its_output(task, export, media, tmp_path, capsys, cached_sample):
    args = [a.format(png=media["seven.png"], wav=media["seven.wav"]) for a in INPUTS[task]]
    rc = sample.main(["--checkpoint", str(export), "--task", task, *args, "--out", str(tmp_path), "steps=2",
                      "tts.length_ratio=4"])
    assert rc == 0
    names = FILES.get(task, ["answer.txt"])   # a spoken answer (sqa): its text and its speech
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    name = names[-1]
    if name == "image.png":
        assert Image.open(tmp_path / name).size == (8, 8)
    elif name == "speech.wav":
        info = sf.info(tmp_path / name)
        assert info.samplerate == 24_000 and info.frames % 320 == 0
    else:
        assert capsys.readouterr().out.strip() == (tmp_path / name).read_text().strip()


def test_sample_cli_errors(export, media, tmp_path, capsys, cached_sample):
    assert sample.main(["--checkpoint", str(export), "--task", "i2t"]) == 2
    assert "--task i2t needs --image" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(export), "--task", "asr", "--audio", str(tmp_path / "x.wav")]) == 2
    assert "x.wav does not exist" in capsys.readouterr().err
    (tmp_path / "bad.wav").write_bytes(b"RIFF....nonsense")
    assert sample.main(["--checkpoint", str(export), "--task", "asr", "--audio", str(tmp_path / "bad.wav")]) == 2
    assert "corrupt_audio" in capsys.readouterr().err
    assert sample.main(["--checkpoint", str(export), "--task", "t2i", "--text", "x", "--image",
                        str(media["seven.png"])]) == 2
    assert "takes no --image" in capsys.readouterr().err


def test_sample_cli_loads_the_export(export, tmp_path, capsys):
    assert sample.main(["--checkpoint", str(export), "--task", "text", "--text", "hi", "steps=2",
                        "text.length=4"]) == 0
    assert sample.main(["--checkpoint", str(tmp_path / "none"), "--task", "text", "--text", "hi"]) == 2
    assert "not a folder" in capsys.readouterr().err


# ---- eval metric wiring (hand-made predictions) -----------------------------------------------------------

def test_task_metrics_text_tasks():
    items = [{"idx": 0, "ref_text": "seven"}, {"idx": 1, "ref_text": "three four"},
             {"idx": 2, "ref_text": "B", "options": ["cat", "dog"]}]
    preds = [{"ok": True, "hyp": "Seven."}, {"ok": True, "hyp": "three"}, {"ok": False}]
    m = evaluate.task_metrics("asr", items, preds)
    assert m["n"] == 3 and m["n_failed"] == 1
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["wer"] == pytest.approx(2 / 4)          # one deletion + the failed item's word, of 4 words
    preds[2] = {"ok": True, "hyp": "b"}
    m = evaluate.task_metrics("vqa", items, preds)
    assert m["option_accuracy"] == 0.0               # "b" picks "dog", the reference "B" is no option text
    items[2]["ref_text"] = "dog"
    assert evaluate.task_metrics("vqa", items, preds)["option_accuracy"] == 1.0
    assert "wer" not in m


def test_task_metrics_tts_and_images():
    tts = evaluate.task_metrics("tts", [{"idx": 0, "spoken": "seven"}, {"idx": 1, "spoken": "one two"}],
                                [{"ok": True, "transcript": "seven"}, {"ok": True, "transcript": "one"}])
    assert tts["wer"] == pytest.approx(1 / 3) and tts["exact_match"] == 0.5

    class ByMean:   # a stand-in classifier: bright images are class 1
        def predict(self, x):
            return (np.asarray(x).reshape(len(x), -1).mean(1) > 127).astype(int)

        def accuracy(self, x, y):
            return float(np.mean(self.predict(x) == np.asarray(y)))

    white, black = np.full((8, 8, 1), 255, np.uint8), np.zeros((8, 8, 1), np.uint8)
    items = [{"idx": 0, "label": 1}, {"idx": 1, "label": 0}, {"idx": 2, "label": 0}, {"idx": 3, "label": None}]
    preds = [{"ok": True, "image": white}, {"ok": True, "image": white}, {"ok": False}, {"ok": True, "image": black}]
    m = evaluate.task_metrics("t2i", items, preds, classifier=ByMean(), real_images={0: white, 1: black, 2: white})
    assert m["class_accuracy"] == pytest.approx(1 / 3)   # the failed generation counts as wrong
    assert m["real_accuracy"] == pytest.approx(2 / 3)
    assert "transcript_exact_match" not in m
    chain = [{**it, "ref_text": w} for it, w in zip(items, ["one", "zero", "zero", "three"])]
    said = [{**p, "hyp": h} for p, h in zip(preds[:2], ["one", "nine"])] + preds[2:]
    m = evaluate.task_metrics("s2i", chain, said, classifier=ByMean())
    assert m["transcript_exact_match"] == 0.25 and m["class_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="--clip-model '/nonexistent': not a local folder"):
        evaluate.clip_score([white], ["a"], "/nonexistent")


def test_results_table_lists_every_metric():
    table = evaluate.format_table({"asr": {"n": 2, "wer": 0.5}, "t2i": {"n": 3, "class_accuracy": 1.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["task", "n", "class_accuracy", "wer"]
    assert lines[2].split() == ["asr", "2", "-", "0.5000"] and lines[3].split() == ["t2i", "3", "1.0000", "-"]

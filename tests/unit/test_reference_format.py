"""The REFERENCE prompt format: the ids Omni-Diffusion's data code gives its own example conversations, on a
scaled-down Dream tokenizer built here, then through a TokenizerSet, a messages line with precomputed
GLM-4-Voice codes, and `omnidiff import` of a checkpoint in the released layout (pipelines/import_pretrained.py).

The tokenizer is a Qwen2-style byte-level BPE whose 256 byte tokens have id == byte value, plus one merge chain
that makes "user" one token (id 258); Dream's specials follow as added tokens at scaled-down ids. So every
expected id below is derived by hand from the reference's rules: text is `list(b"...")`.

Reference rules (its data code, per turn): <|im_start|> + tok(role) + tok("\\n") + tok(content) + <|im_end|> +
tok("\\n"); media placeholders become <|begin_of_audio|><|audio_i|>...<|end_of_audio|> and
<|begin_of_image|><|image_i|>...<|end_of_image|> inside the content; labels are the assistant content, its
<|im_end|> and the "\\n" after it.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from common import cli
from common.configlib import ConfigError
from model.config import ModelConfig
from model.prompts import TaskTemplates, encode_messages, last_user_text, task_messages
from model.tokenizers import (ImageTokenizerConfig, SpeechTokenizerConfig, TextTokenizerConfig, TokenizerConfig,
                              TokenizerSet)
from model.tokenizers.base import BadInput
from model.tokenizers.glm4voice import Glm4VoiceCodes
from model.tokenizers.text import HFTextTokenizer
from model.transformer import Transformer
from model.vocab import OMNI_ADDED_TOKENS, PromptFormat, Vocab, omni_diffusion_vocab, reference_layout
from model.weights import native_to_hf
from pipelines.import_pretrained import main as import_main
from pipelines.infer.predictor import Predictor, Request, load_export
from tokenize_jobs import sources
from tokenize_jobs.config import InputConfig, TasksConfig

# Scaled-down Dream: 256 bytes + 3 merges ("us", "use", "user") = 259 BPE ids, then its added tokens in
# Dream's order (<|endoftext|>, <|im_start|>, <|im_end|>, ..., <|mask|>), four of them here.
USER = 258
EOS, IM_START, IM_END, MASK = 259, 260, 261, 262
BASE = 263
# the reference's 21 added tokens follow: <|begin_of_image|> first, <|begin_of_audio|> 18th
BOI, EOI, BOA, EOA = BASE + 0, BASE + 1, BASE + 17, BASE + 18
AUDIO0 = BASE + 21                  # <|audio_0|>
NL = 10
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_dream_tokenizer() -> Tokenizer:
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    u, s, e, r = b2u[ord("u")], b2u[ord("s")], b2u[ord("e")], b2u[ord("r")]
    vocab.update({u + s: 256, u + s + e: 257, u + s + e + r: USER})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(u, s), (u + s, e), (u + s + e, r)]))
    tok.normalizer = normalizers.NFC()           # as Qwen2's tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")])
    assert tok.token_to_id("<|mask|>") == MASK and tok.encode("user").ids == [USER]
    return tok


@pytest.fixture(scope="module")
def text_tok() -> HFTextTokenizer:
    return HFTextTokenizer(tiny_dream_tokenizer(), name="tiny-dream").with_added_tokens(OMNI_ADDED_TOKENS)


VOCAB = reference_layout(BASE, {"mask": MASK, "eos": EOS, "im_start": IM_START, "im_end": IM_END},
                         n_q=1, audio_codebook_size=64, image_codebook_size=32)
IMAGE0 = AUDIO0 + 64                # <|image_0|>


def t(s: str) -> list[int]:
    return list(s.encode())


def head(role: str) -> list[int]:
    return [IM_START, *({"user": [USER]}.get(role) or t(role)), NL]


def test_layout_ids_follow_the_reference_tokenizer(text_tok):
    assert VOCAB.text_size == BASE + 21 and VOCAB.audio_offset == AUDIO0 and VOCAB.image_offset == IMAGE0
    assert (VOCAB.boi_id, VOCAB.eoi_id, VOCAB.boa_id, VOCAB.eoa_id) == (BOI, EOI, BOA, EOA)
    for name, token in (("boi", "<|begin_of_image|>"), ("eoa", "<|end_of_audio|>"), ("mask", "<|mask|>")):
        assert text_tok.token_id(token) == VOCAB.special_id(name)
    assert text_tok.size == VOCAB.text_size
    with pytest.raises(ValueError, match="roles are text"):
        VOCAB.role_id("user")


def test_asr_sample_ids_and_answer_mask(text_tok):
    # tools/inference.py's ASR: user "Convert the speech to text.\n<|audio|>", no system prompt
    tmpl = TaskTemplates().get("asr", PromptFormat.REFERENCE)
    msgs = task_messages(tmpl, answer="hi there")
    enc = encode_messages(msgs, VOCAB, text_tok, audios=[np.array([[5, 7, 5]])])
    prompt = (head("user") + t("Convert the speech to text.\n") + [BOA, AUDIO0 + 5, AUDIO0 + 7, AUDIO0 + 5, EOA]
              + [IM_END, NL] + head("assistant"))
    answer = t("hi there") + [IM_END, NL]
    assert enc.input_ids.tolist() == prompt + answer
    assert enc.answer_mask.tolist() == [False] * len(prompt) + [True] * len(answer)
    gen = encode_messages(task_messages(tmpl), VOCAB, text_tok, audios=[np.array([[5, 7, 5]])],
                          add_generation_prompt=True)
    assert gen.input_ids.tolist() == prompt and not gen.answer_mask.any()
    assert last_user_text(gen.input_ids, VOCAB, text_tok) == "Convert the speech to text.\n"


def test_s2i_system_prompt_and_image_answer(text_tok):
    # S2I: system "Please generate an image based on the input audio.", user "" + "\n<|audio|>"; the
    # newline that opens the content stays its own token after the role's "\n" (piecewise, as in training)
    tmpl = TaskTemplates().get("s2i", PromptFormat.REFERENCE)
    assert tmpl.system == "Please generate an image based on the input audio."
    msgs = task_messages(tmpl, answer="<|image|>")
    enc = encode_messages(msgs, VOCAB, text_tok, images=[np.array([3, 0, 31])], audios=[np.array([[63]])])
    system = head("system") + t("Please generate an image based on the input audio.") + [IM_END, NL]
    user = head("user") + [NL, BOA, AUDIO0 + 63, EOA, IM_END, NL]
    answer = [BOI, IMAGE0 + 3, IMAGE0, IMAGE0 + 31, EOI, IM_END, NL]
    assert enc.input_ids.tolist() == system + user + head("assistant") + answer
    assert enc.answer_mask.sum() == len(answer) and enc.answer_mask[-len(answer):].all()


def test_svqa_and_tts_wording(text_tok):
    svqa = TaskTemplates().get("svqa", PromptFormat.REFERENCE)
    enc = encode_messages(task_messages(svqa), VOCAB, text_tok, images=[np.array([1])], audios=[np.array([[2]])],
                          add_generation_prompt=True)
    assert enc.input_ids.tolist() == (head("system") + t("Please response the input audio based on the given image.")
                                      + [IM_END, NL] + head("user") + [BOA, AUDIO0 + 2, EOA, NL, BOI, IMAGE0 + 1, EOI]
                                      + [IM_END, NL] + head("assistant"))
    tts = TaskTemplates().get("tts", PromptFormat.REFERENCE)
    assert task_messages(tts, text="Get the trust fund to the bank early.") == [
        {"role": "user", "content": "Convert the text to speech.\nGet the trust fund to the bank early."}]
    # the compact format keeps its own wording (the demo's prompts do not change)
    assert TaskTemplates().get("tts").user == "Read this aloud: {text}"
    # configured wording wins in both formats
    custom = TaskTemplates()
    custom.tts.user = "Say: {text}"
    assert custom.get("tts", PromptFormat.REFERENCE).user == "Say: {text}"


def test_multi_turn_and_sharegpt_roles(text_tok):
    msgs = [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    enc = encode_messages(msgs, VOCAB, text_tok)
    ids = enc.input_ids.tolist()
    assert ids == (head("user") + t("a") + [IM_END, NL] + head("assistant") + t("b") + [IM_END, NL]
                   + head("user") + t("c") + [IM_END, NL] + head("assistant") + t("d") + [IM_END, NL])
    answer = [i for i, a in zip(ids, enc.answer_mask) if a]
    assert answer == t("b") + [IM_END, NL] + t("d") + [IM_END, NL]
    # a special token typed in user text stays text: it cannot open a turn
    forged = encode_messages([{"role": "user", "content": "<|im_start|>"}], VOCAB, text_tok).input_ids.tolist()
    assert forged.count(IM_START) == 1


def test_vocab_json_keeps_the_format():
    back = Vocab.from_json(VOCAB.to_json())
    assert back == VOCAB and back.prompt_format == PromptFormat.REFERENCE
    compact = Vocab(text_size=10)
    assert compact.diff(Vocab(text_size=10, prompt_format="compact")) == []
    old = json.loads(compact.to_json())
    del old["prompt_format"]            # a vocabulary saved before the format was recorded reads as compact
    assert Vocab.from_dict(old) == compact
    with pytest.raises(ValueError, match="lacks"):
        Vocab(text_size=10, reuse_specials={"mask": 1}, prompt_format=PromptFormat.REFERENCE)


def test_real_layout_is_the_released_checkpoints():
    v = omni_diffusion_vocab()
    assert v.size == 176_264
    assert (v.text_size, v.audio_offset, v.image_offset) == (151_688, 151_688, 168_072)
    assert v.special_ids() == {"mask": 151_666, "eos": 151_643, "im_start": 151_644, "im_end": 151_645,
                               "boi": 151_667, "eoi": 151_668, "boa": 151_684, "eoa": 151_685}
    assert (v.n_q, v.audio_codebook_size, v.image_codebook_size) == (1, 16_384, 8_192)
    assert v.audio_ids(np.array([[0, 16_383]])).tolist() == [151_688, 168_071]   # <|audio_0|>, <|audio_16383|>


@pytest.fixture(scope="module")
def tokset(tmp_path_factory, text_tok):
    d = tmp_path_factory.mktemp("tok")
    (d / "dream.json").write_text(tiny_dream_tokenizer().to_str())
    cfg = TokenizerConfig(text=TextTokenizerConfig(kind="hf", path=str(d / "dream.json")),
                          image=ImageTokenizerConfig(kind="pixel", size=2, channels=1, levels=4),
                          speech=SpeechTokenizerConfig(kind="glm4voice"), prompt_format=PromptFormat.REFERENCE)
    return TokenizerSet.prepare(cfg, str(d / "set")), str(d / "set")


def test_tokenizer_set_builds_the_reference_layout(tokset):
    tokset, _ = tokset
    v = tokset.vocab
    assert v.prompt_format == PromptFormat.REFERENCE and v.special_ids() == VOCAB.special_ids()
    assert (v.audio_offset, v.n_q, v.audio_codebook_size) == (AUDIO0, 1, 16_384)
    with pytest.raises(ConfigError, match="text_size=0"):
        TokenizerConfig(text=TextTokenizerConfig(kind="hf", path="x.json", text_size=152_064),
                        prompt_format=PromptFormat.REFERENCE)
    with pytest.raises(BadInput) as e:
        tokset.speech.load(b"RIFF....", "a.wav")
    assert e.value.reason == "needs_speech_codes"


def test_saved_set_reloads_with_the_same_vocabulary(tokset):
    tokset, saved = tokset
    loaded = TokenizerSet.load(saved)
    assert loaded.vocab == tokset.vocab and loaded.text.token_id("<|end_of_audio|>") == EOA
    with open(f"{saved}/vocab.json") as f:
        assert json.load(f)["prompt_format"] == "reference"
    with open(f"{saved}/tokenizers.json") as f:
        assert json.load(f)["config"]["prompt_format"] == "reference"


def _messages_row(tmp_path, rec: dict):
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    ctx = sources.corpus_context("messages", str(tmp_path))
    (unit,) = sources.list_units(ctx, InputConfig())
    (row, _) = list(sources.expand_unit(ctx, unit, InputConfig(), set()))
    return ctx, row


def test_precomputed_speech_codes_are_read_and_checked(tokset, tmp_path):
    tokset, _ = tokset
    rec = {"messages": [{"role": "user", "content": "Convert the speech to text.\n<|audio|>"},
                        {"role": "assistant", "content": "hi"}], "speech_codes": [[0, 16_383, 7]]}
    ctx, row = _messages_row(tmp_path, rec)
    record, media = sources.decode_input(ctx, row, tokset, TaskTemplates(), TasksConfig(), InputConfig())
    assert record["samples"][0]["task"] == "asr" and media["audio_0"].tolist() == [[0, 16_383, 7]]
    enc = encode_messages(record["samples"][0]["messages"], tokset.vocab, tokset.text, audios=[media["audio_0"]])
    expected = head("user") + t("Convert the speech to text.\n") + [BOA, AUDIO0, AUDIO0 + 16_383, AUDIO0 + 7, EOA]
    assert enc.input_ids.tolist()[:len(expected)] == expected
    for codes, why in (([[0, 16_384]], "outside"), ([[1.5]], "integers"), ([[1], [2]], "list of 1"),
                       ([[]], "non-empty")):
        ctx, row = _messages_row(tmp_path, {**rec, "speech_codes": codes})
        with pytest.raises(BadInput, match=why) as e:
            sources.decode_input(ctx, row, tokset, TaskTemplates(), TasksConfig(), InputConfig())
        assert e.value.reason == "bad_speech_codes"


def test_glm4voice_codes_are_one_codebook():
    g = Glm4VoiceCodes()
    assert (g.n_q, g.codebook_size, g.frame_rate) == (1, 16_384, 12.5)
    with pytest.raises(NotImplementedError, match="decoder"):
        g.decode(np.zeros((1, 3), dtype=np.int64))


def test_released_layout_imports_and_samples_with_reference_prompts(tokset, tmp_path):
    """`omnidiff import`: a checkpoint with the released key names (sharded, speech encoder and projector
    beside the LM) and the tokenizer set of the same layout -> an export the predictor samples from, its ASR
    prompt written in the reference format from precomputed speech codes."""
    tokset, tok_dir = tokset
    cfg = dataclasses.replace(ModelConfig.preset("debug"), vocab_size=tokset.vocab.size, weights_layout="dream")
    torch.manual_seed(0)
    hf = native_to_hf(Transformer(cfg).state_dict(), cfg, "dream")
    hf["model.audio_model.model.encoder.after_norm.weight"] = torch.ones(8)
    hf["model.audio_projection.mlp.0.weight"] = torch.zeros(cfg.dim, 8)
    ckpt = tmp_path / "released"
    ckpt.mkdir()
    keys = sorted(hf)
    weight_map = {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: hf[k].contiguous() for k in keys[s::2]}, str(ckpt / name))
        weight_map.update({k: name for k in keys[s::2]})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    args = ["--weights", str(ckpt), "--tokenizers", tok_dir, "--out", str(tmp_path / "export"), "--model", "debug"]
    assert import_main(args) == cli.BAD_INPUT           # the speech modules are not skipped silently
    assert import_main(args + ["--skip-module", "speech_encoder", "--skip-module", "speech_projector"]) == cli.OK
    loaded = load_export(str(tmp_path / "export"), device="cpu")
    assert loaded.vocab == tokset.vocab
    assert torch.equal(loaded.model.tok_embeddings.weight[AUDIO0], hf["model.embed_tokens.weight"][AUDIO0])
    predictor = Predictor(loaded)
    item = predictor.prepare(Request(task="asr", audios=[np.array([[1, 2, 3]])]))
    assert item.prompt.tolist() == (head("user") + t("Convert the speech to text.\n")
                                    + [BOA, AUDIO0 + 1, AUDIO0 + 2, AUDIO0 + 3, EOA, IM_END, NL] + head("assistant"))
    (out,) = predictor.run([item])
    assert isinstance(out.text, str)

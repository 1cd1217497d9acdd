import numpy as np
import pytest

from model.prompts import TaskTemplates, encode_messages, task_messages
from model.tasks import infer_task
from model.tokenizers.base import BadInput
from model.vocab import Vocab


class ByteTok:
    """Text tokenizer stand-in: one id per UTF-8 byte (the real BPE is tested in test_text_tokenizer)."""
    name = "bytes"
    size = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()

    def fingerprint(self):
        return "bytes"


VOCAB = Vocab(text_size=256, n_q=2, image_codebook_size=17)


def test_answer_mask_covers_assistant_content_and_im_end_only():
    msgs = [{"role": "user", "content": "<|image|>\nwhat?"}, {"role": "assistant", "content": "seven"}]
    enc = encode_messages(msgs, VOCAB, ByteTok(), images=[np.arange(4)])
    ids, ans = enc.input_ids.tolist(), enc.answer_mask
    answer_ids = [i for i, a in zip(ids, ans) if a]
    assert answer_ids == list(b"seven") + [VOCAB.im_end_id]
    # the prompt holds the image span bracketed, in order
    start = ids.index(VOCAB.boi_id)
    assert ids[start + 1:start + 5] == VOCAB.image_ids(np.arange(4)).tolist()
    assert ids[start + 5] == VOCAB.eoi_id
    # <im_start><assistant> stays in the prompt
    k = ids.index(VOCAB.role_id("assistant"))
    assert not ans[k] and not ans[k - 1] and ans[k + 1]


def test_audio_frame_major_and_placeholder_mismatch():
    codes = np.array([[1, 2, 3], [4, 5, 6]])  # (n_q=2, T=3)
    enc = encode_messages([{"role": "user", "content": "<|audio|>"}], VOCAB, ByteTok(), audios=[codes])
    ids = enc.input_ids.tolist()
    span = ids[ids.index(VOCAB.boa_id) + 1: ids.index(VOCAB.eoa_id)]
    assert np.array_equal(VOCAB.audio_codes(np.array(span)), codes)
    with pytest.raises(BadInput) as e:
        encode_messages([{"role": "user", "content": "<|audio|> <|audio|>"}], VOCAB, ByteTok(), audios=[codes])
    assert e.value.reason == "placeholder_mismatch"


def test_generation_prompt_is_training_prefix():
    tmpl = TaskTemplates().get("i2t")
    full = encode_messages(task_messages(tmpl, answer="seven"), VOCAB, ByteTok(), images=[np.zeros(4, int)])
    prompt = encode_messages(task_messages(tmpl), VOCAB, ByteTok(), images=[np.zeros(4, int)],
                             add_generation_prompt=True)
    n = len(prompt)
    assert full.input_ids[:n].tolist() == prompt.input_ids.tolist()
    assert not full.answer_mask[:n].any() and full.answer_mask[n:].all()


@pytest.mark.parametrize("user,answer,task", [
    ("<|image|>\nDescribe", "seven", "i2t"), ("Draw seven", "<|image|>", "t2i"),
    ("<|audio|>", "<|image|>", "s2i"), ("<|audio|>", "seven", "asr"), ("say seven", "<|audio|>", "tts"),
    ("<|image|><|audio|>", "seven", "svqa"), ("hi", "hello", "text")])
def test_infer_task(user, answer, task):
    assert infer_task([{"role": "user", "content": user}, {"role": "assistant", "content": answer}]) == task


def test_bad_role_is_bad_input():
    with pytest.raises(BadInput) as e:
        encode_messages([{"role": "bot", "content": "x"}], VOCAB, ByteTok())
    assert e.value.reason == "bad_role"

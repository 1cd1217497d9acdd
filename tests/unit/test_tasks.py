"""model/tasks.py: the task registry that tokenization, training, inference and evaluation read."""
from __future__ import annotations

import re

import pytest

from model import tasks
from model.prompts import TaskTemplates, answer_content
from model.tasks import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, TASKS, Judge, TaskSampler, infer_task, spec
from model.vocab import Modality


def test_task_ids_are_the_registry_order():
    # a task's index is its id in packed batches and in the trainer's per-task loss table, computed per batch from
    # the task names shards store: new tasks are appended, so earlier ids stay as they were
    assert TASKS == ("t2i", "i2t", "vqa", "asr", "tts", "s2i", "svqa", "text", "sqa")
    assert [t.name for t in tasks.all_tasks()] == list(TASKS)


def test_every_task_is_consistent_with_its_template():
    for t in tasks.all_tasks():
        # the prompt holds exactly the task's media placeholders, in order
        shown = [Modality.IMAGE if p == IMAGE_PLACEHOLDER else Modality.AUDIO
                 for p in re.findall(r"<\|image\|>|<\|audio\|>", t.user)]
        assert tuple(shown) == t.inputs, t.name
        # a media answer is judged on its media; a text answer on its text
        assert (t.judge == Judge.TEXT) == (t.answer == Modality.TEXT), t.name
        assert TaskTemplates().get(t.name).user == t.user


def test_answer_content_follows_the_answer_modality():
    assert answer_content("i2t", "a cat") == "a cat"
    assert answer_content("t2i", "a cat") == IMAGE_PLACEHOLDER
    assert answer_content("tts", "hello") == AUDIO_PLACEHOLDER


def test_canvas_layout_adds_a_text_head_only_when_the_sampler_asks():
    assert spec("s2i").canvas_layout(TaskSampler()) == (Modality.IMAGE,)
    assert spec("s2i").canvas_layout(TaskSampler(transcript=2)) == (Modality.TEXT, Modality.IMAGE)
    assert spec("svqa").canvas_layout(TaskSampler(speech_answer=True)) == (Modality.TEXT, Modality.AUDIO)
    assert spec("i2t").canvas_layout(TaskSampler()) == (Modality.TEXT,)


@pytest.mark.parametrize("prompt, answer, task", [
    ("describe", "text", "text"),
    (f"{IMAGE_PLACEHOLDER} what?", "a cat", "i2t"),
    (f"{AUDIO_PLACEHOLDER}", "hello", "asr"),
    (f"{IMAGE_PLACEHOLDER} {AUDIO_PLACEHOLDER}", "two", "svqa"),
    ("draw a cat", IMAGE_PLACEHOLDER, "t2i"),
    (f"{AUDIO_PLACEHOLDER}", f"seven{IMAGE_PLACEHOLDER}", "s2i"),
    (f"{IMAGE_PLACEHOLDER} draw it again", IMAGE_PLACEHOLDER, "t2i"),   # extra prompt media: same task
    ("say hi", AUDIO_PLACEHOLDER, "tts"),
    (f"{AUDIO_PLACEHOLDER}", AUDIO_PLACEHOLDER, "sqa"),              # spoken question, spoken answer
    (f"{AUDIO_PLACEHOLDER}", f"Paris.\n{AUDIO_PLACEHOLDER}", "sqa"),  # ... text then speech (the reference's)
    (f"{IMAGE_PLACEHOLDER}\n{AUDIO_PLACEHOLDER}", f"A dog.\n{AUDIO_PLACEHOLDER}", "svqa"),
    (f"{AUDIO_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}", AUDIO_PLACEHOLDER, "svqa"),
])
def test_infer_task_matches_inputs_and_answer(prompt, answer, task):
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    assert infer_task(msgs) == task


def test_reference_spoken_lines_get_their_task():
    """The reference's SFT lines: spoken VQA (system prompt, audio then image, answer text then speech) and
    spoken QA; both were `tts` before spoken tasks could take speech answers."""
    svqa = [{"role": "system", "content": "Please response the input audio based on the given image."},
            {"role": "user", "content": f"{AUDIO_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}"},
            {"role": "assistant", "content": f"He is angling himself to better hit the ball.\n{AUDIO_PLACEHOLDER}"}]
    sqa = [{"role": "system", "content": "Please response the input audio."},
           {"role": "user", "content": AUDIO_PLACEHOLDER},
           {"role": "assistant", "content": f"It is Paris.\n{AUDIO_PLACEHOLDER}"}]
    tts = [{"role": "user", "content": "Convert the text to speech.\nHello."},
           {"role": "assistant", "content": AUDIO_PLACEHOLDER}]
    assert (infer_task(svqa), infer_task(sqa), infer_task(tts)) == ("svqa", "sqa", "tts")
    assert spec("sqa").canvas_layout(spec("sqa").sampler) == (Modality.TEXT, Modality.AUDIO)


def test_unknown_task_names_the_tasks_and_samplers_are_fresh_copies():
    with pytest.raises(ValueError, match="unknown task 'x'.*t2i"):
        spec("x")
    s = tasks.default_sampler("tts")
    s.length_ratio = 99.0
    assert spec("tts").sampler.length_ratio == 3.5


def test_speech_and_headline_metric_come_from_inputs_answer_and_judge():
    assert [t.name for t in tasks.all_tasks() if t.speech] == ["asr", "tts", "s2i", "svqa", "sqa"]
    assert {t.name: t.metric for t in tasks.all_tasks()}["t2i"] == "class_accuracy"
    assert spec("tts").metric == "exact_match" and spec("tts").judge == Judge.SPEECH

"""Classifier-free guidance's unconditional prompts, per task (`TaskSampler.uncond`, model/tasks.py).

    masked       None: `generate` masks every token of the prompt (Dream / LLaDA), the default
    empty_user   the task's system prompt and an empty user turn (reference S2I:
                 "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|im_end|>\\n<|im_start|>assistant\\n")
    random_text  the user turn with random text ids in place of its `{text}`, as many as the text has tokens
                 (reference T2I: the instruction, then random ids below <|begin_of_audio|>, drawn without
                 replacement), so the unconditional prompt is as long as the conditional one

Both end with `<im_start><assistant>` like every sampling prompt; the predictor appends the media answer's
opening bracket to both.
"""
from __future__ import annotations

import numpy as np

from model.prompts import TaskTemplate, encode_messages, task_messages
from model.tasks import Uncond
from model.vocab import Vocab


def uncond_prompt(kind: Uncond, template: TaskTemplate, vocab: Vocab, text_tok, *, n_text: int = 0,
                  rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The unconditional prompt ids (P',) for `kind`; None for "masked" (generate's default). `n_text`: tokens
    of the request's `{text}` (random_text draws that many ids)."""
    if kind == "masked":
        return None
    if kind == "empty_user":
        msgs = task_messages(TaskTemplate(user="", system=template.system))
        return encode_messages(msgs, vocab, text_tok, add_generation_prompt=True).input_ids.astype(np.int64)
    if kind == "random_text":
        if "{text}" not in template.user:
            raise ValueError(f"uncond=random_text needs a user template with {{text}}, got {template.user!r}")
        head, tail = template.user.split("{text}", 1)
        # the turns up to the instruction, then random ids, then the rest of the turn: `<im_start><role>
        # content <im_end>` is the turn layout (model/prompts.py), so the head's closing <im_end> is dropped
        before = encode_messages(task_messages(TaskTemplate(user=head, system=template.system)), vocab,
                                 text_tok).input_ids[:-1]
        pool = np.setdiff1d(np.arange(vocab.text_size), np.fromiter(vocab.reuse_specials.values(), int))
        rng = rng or np.random.default_rng(0)
        noise = rng.choice(pool, size=min(n_text, pool.size), replace=False)
        after = [*text_tok.encode(tail), vocab.im_end_id, vocab.im_start_id, vocab.role_id("assistant")]
        return np.concatenate([before, noise, after]).astype(np.int64)
    raise ValueError(f"unknown uncond {kind!r}; expected masked, empty_user or random_text")

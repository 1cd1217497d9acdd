"""sample: one denoising step of model.sampling.generate against one plain forward on the same batch; generated
tokens/s vs batch size; an image canvas with the head over the image ids vs every vocabulary row; MAGVIT-v2
encode images/s at 256x256. Runs without Ray (a bare GPU node is enough)."""
from __future__ import annotations

import time
from typing import Any, Callable

from bench.common import Suite, bench_vocab, cuda_available, goal_check, paired_ratio, spread, torch_threads


def _seconds(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(suite: Suite) -> dict[str, Any]:
    """Per batch size: generate's step time vs a plain forward, interleaved repeat by repeat; then the image
    canvas's subset head vs the full head; then MAGVIT-v2 encoding."""
    import torch

    from model.config import ModelConfig
    from model.sampling import generate
    from model.tokenizers.magvit2 import bench_encode
    from model.transformer import Transformer
    from model.vocab import Modality

    plan = suite.plan
    vocab = bench_vocab(plan.big_vocab)
    torch.manual_seed(0)
    device = torch.device("cuda" if cuda_available() else "cpu")
    model = Transformer(ModelConfig.preset(plan.sample_model), vocab_size=vocab.size,
                        media_markers=vocab.media_markers).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)   # as pipelines.infer.predictor.load_model serves it on a GPU (dtype auto)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lo, hi = vocab.text_range()
    per_batch = {}
    with torch_threads(plan.threads), torch.no_grad():
        for B in plan.sample_batches:
            prompt = torch.randint(lo, hi, (B, plan.prompt_len), generator=torch.Generator().manual_seed(B))
            prompt = prompt.to(device)                                                        # (B, P)
            masks = torch.full_like(prompt[:, :1], vocab.mask_id).expand(B, plan.gen_length)  # (B, 1) -> (B, G)
            full = torch.cat([prompt, masks], dim=1)                                           # (B, P + G)
            gen_s, fwd_s = [], []
            # interleaved: each repeat times one generate and one forward under the same load
            gen_fn = lambda: (generate(model, prompt, vocab=vocab, gen_length=plan.gen_length,  # noqa: E731
                                       steps=plan.gen_steps, modality=Modality.TEXT), sync())
            # the same forward generate makes: the head on the canvas columns only
            canvas_cols = torch.zeros(full.shape, dtype=torch.bool, device=device)
            canvas_cols[:, prompt.shape[1]:] = True
            fwd_fn = lambda: (model(full, None, only=canvas_cols), sync())  # noqa: E731
            gen_fn(), fwd_fn()  # warm-up
            for _ in range(plan.repeats):
                gen_s.append(_seconds(gen_fn))
                fwd_s.append(_seconds(fwd_fn))
            step_s = [g / plan.gen_steps for g in gen_s]
            ratio = paired_ratio(step_s, fwd_s)
            per_batch[B] = {"step_s": spread(step_s), "forward_s": spread(fwd_s), "step_vs_forward": ratio,
                            "tokens_per_s": spread([B * plan.gen_length / g for g in gen_s])}
        # an image canvas at the largest batch: the head over the image codes alone (generate's subset head, the
        # default) vs every vocabulary row with the rest masked to -inf; the same canvases come out
        B = max(plan.sample_batches)
        prompt = torch.randint(lo, hi, (B, plan.prompt_len), generator=torch.Generator().manual_seed(B)).to(device)
        image_s: dict[bool, list[float]] = {True: [], False: []}
        canvases = {}
        for subset in (True, False):   # warm-up
            canvases[subset] = generate(model, prompt, vocab=vocab, gen_length=plan.gen_length, steps=plan.gen_steps,
                                        modality=Modality.IMAGE, subset_head=subset)
        for _ in range(plan.repeats):
            for subset in (True, False):
                image_s[subset].append(_seconds(lambda: (generate(  # noqa: B023
                    model, prompt, vocab=vocab, gen_length=plan.gen_length, steps=plan.gen_steps,
                    modality=Modality.IMAGE, subset_head=subset), sync())) / plan.gen_steps)
        lo_i, hi_i = vocab.image_range()
        image = {"batch": B, "image_ids": hi_i - lo_i, "vocab_rows": model.cfg.vocab_size or vocab.size,
                 "subset_step_s": spread(image_s[True]), "full_step_s": spread(image_s[False]),
                 "subset_vs_full": paired_ratio(image_s[True], image_s[False]),
                 "same_canvas": bool(torch.equal(canvases[True], canvases[False]))}
    largest = per_batch[max(plan.sample_batches)]
    with torch_threads(plan.threads):
        # one call: its own warm-up per batch size, then `magvit_repeats` timed calls (their mean)
        mag = bench_encode(256, plan.magvit_batches, preset=plan.magvit_preset, repeats=plan.magvit_repeats,
                           device="cuda" if cuda_available() else "cpu")
    return {"model": plan.sample_model, "prompt_len": plan.prompt_len, "gen_length": plan.gen_length,
            "gen_steps": plan.gen_steps, "by_batch": per_batch, "image_canvas": image,
            "step_vs_forward": largest["step_vs_forward"],
            **goal_check("sample.step_vs_forward", largest["step_vs_forward"]["median"]),
            "magvit2_encode": {"preset": plan.magvit_preset, "size": 256, "repeats": plan.magvit_repeats,
                               "images_per_s": {bs: spread([mag[bs]]) for bs in plan.magvit_batches}}}


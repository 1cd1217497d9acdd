"""sample: one denoising step of model.sampling.generate against one plain forward on the same batch; generated
tokens/s vs batch size; an image canvas with the head over the image ids vs every vocabulary row; fast sampling
(block-wise key/value cache, confidence threshold) vs the plain sampler on text, image and speech canvases;
MAGVIT-v2 encode images/s at 256x256. Runs without Ray (a bare GPU node is enough)."""
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
        fast = fast_sampling(plan, device)
    with torch_threads(plan.threads):
        # one call: its own warm-up per batch size, then `magvit_repeats` timed calls (their mean)
        mag = bench_encode(256, plan.magvit_batches, preset=plan.magvit_preset, repeats=plan.magvit_repeats,
                           device="cuda" if cuda_available() else "cpu")
    return {"model": plan.sample_model, "prompt_len": plan.prompt_len, "gen_length": plan.gen_length,
            "gen_steps": plan.gen_steps, "by_batch": per_batch, "image_canvas": image, "fast": fast,
            "step_vs_forward": largest["step_vs_forward"],
            **goal_check("sample.step_vs_forward", largest["step_vs_forward"]["median"]),
            "magvit2_encode": {"preset": plan.magvit_preset, "size": 256, "repeats": plan.magvit_repeats,
                               "images_per_s": {bs: spread([mag[bs]]) for bs in plan.magvit_batches}}}



# A model of realistic proportions that samples on CPU in seconds: grouped-query attention (4 query heads per
# key/value head), SwiGLU 2.75x, a head about 1/6 of the body (Dream-7B's is ~1/10). init_std 0.5 spreads its
# untrained confidences as a confident model's (first step: median top probability 0.7-0.96 per canvas kind,
# 25-57% of positions above 0.9); at 0.02 every position is near uniform and no threshold ever passes. How
# often a trained model passes is the eval's to say (docs/inference.md, "Fast sampling").
FAST_MODEL = {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 2, "hidden_dim": 704, "seq_len": 1024,
              "init_std": 0.5}
# (name, modality, prompt length, canvas length G): a text answer, a 256-token image (MAGVIT-v2 16 x 16), a
# speech answer (~55 text tokens at 3.5 EnCodec ids each)
FAST_CANVASES = (("text", "TEXT", 64, 64), ("image", "IMAGE", 32, 256), ("speech", "AUDIO", 32, 192))
# the plain sampler (G/2 steps, one block), the cache (blocks of 32, dual), the cache and a 0.9 threshold with
# the `fast` preset's floor: one token a step for text (Fast-dLLM), the schedule's count for media
FAST_SETTINGS = {"plain": {}, "cache": {"kv_cache": "dual", "block_length": 32},
                 "cache+threshold": {"kv_cache": "dual", "block_length": 32, "unmask_threshold": 0.9}}
FAST_FLOOR = {"text": "one", "image": "schedule", "speech": "schedule"}


class _Counted:
    """Calls the model and counts its cost in full forwards (`model.kvcache.window_cost`)."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls, self.forwards = model, 0, 0.0

    def __call__(self, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        from model.kvcache import window_cost

        self.calls += 1
        self.forwards += window_cost(kwargs.get("window"), input_ids.shape[1])
        return self.model(input_ids, *args, **kwargs)


def fast_sampling(plan: Any, device: Any) -> dict[str, Any]:
    """Per canvas: generated tokens/s and full-forward equivalents per generated token of FAST_SETTINGS on the
    same batch of prompts, settings interleaved repeat by repeat; ratios vs "plain" paired per repeat."""
    import dataclasses

    import torch

    from model.config import ModelConfig
    from model.sampling import default_steps, generate
    from model.transformer import Transformer
    from model.vocab import Modality

    vocab = bench_vocab(plan.big_vocab)
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.preset("debug"), **FAST_MODEL)
    if plan.mode == "tiny":
        cfg = dataclasses.replace(cfg, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172)
    model = Transformer(cfg, vocab_size=vocab.size, media_markers=vocab.media_markers).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B = plan.fast_batch
    lo, hi = vocab.text_range()
    out: dict[str, Any] = {"model": {k: getattr(cfg, k) for k in FAST_MODEL}, "params": model.num_params(),
                           "batch": B, "canvases": {}}
    for name, modality, P, G in FAST_CANVASES:
        G, P = (min(G, 32), min(P, 8)) if plan.mode == "tiny" else (G, P)
        prompt = torch.randint(lo, hi, (B, P), generator=torch.Generator().manual_seed(P + G)).to(device)
        steps = default_steps(G)
        seconds: dict[str, list[float]] = {k: [] for k in FAST_SETTINGS}
        cost: dict[str, dict[str, float]] = {}
        canvases: dict[str, Any] = {}
        settings = {k: {**kw, "unmask_floor": FAST_FLOOR[name]} if "unmask_threshold" in kw else kw
                    for k, kw in FAST_SETTINGS.items()}
        for setting, kw in settings.items():   # warm-up: each path on a short canvas
            generate(model, prompt, vocab=vocab, gen_length=32, steps=2, modality=Modality[modality],
                     **{**kw, "block_length": None})
        for _ in range(plan.repeats):
            for setting, kw in settings.items():
                counted = _Counted(model)
                t = time.perf_counter()
                canvases[setting] = generate(counted, prompt, vocab=vocab, gen_length=G, steps=steps,
                                             modality=Modality[modality], **kw)
                sync()
                seconds[setting].append(time.perf_counter() - t)
                cost[setting] = {"forwards_per_token": counted.forwards / G, "calls_per_token": counted.calls / G}
        # the cache's approximation alone: the uncached sampler with the same blocks, once (untimed)
        blocks = generate(model, prompt, vocab=vocab, gen_length=G, steps=steps, modality=Modality[modality],
                          block_length=settings["cache"]["block_length"])
        res: dict[str, Any] = {"prompt_len": P, "gen_length": G, "steps": steps}
        for setting in FAST_SETTINGS:
            res[setting] = {"tokens_per_s": spread([B * G / s for s in seconds[setting]]), **cost[setting],
                            "same_as_plain": float((canvases[setting] == canvases["plain"]).float().mean()),
                            "same_as_uncached_blocks": float((canvases[setting] == blocks).float().mean())}
            if setting != "plain":
                res[setting]["speedup"] = paired_ratio(seconds["plain"], seconds[setting])
        out["canvases"][name] = res
    return out

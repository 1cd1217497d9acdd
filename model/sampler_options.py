"""The sampler's option names (model/sampling.py `generate`, model/kvcache.py): a torch-free module, so task specs
and job configs validate against them in processes that never sample (the tokenize job's expand and write
workers start without importing torch)."""
from __future__ import annotations

from typing import Literal

Alg = Literal["entropy", "maskgit_plus", "topk_margin", "random", "origin", "entropy-penalty"]
ALGS = ("entropy", "maskgit_plus", "topk_margin", "random", "origin", "entropy-penalty")
Schedule = Literal["even", "dream"]
SCHEDULES = ("even", "dream")
PenaltyOn = Literal["confidence", "logits"]
Ties = Literal["topk", "first"]
Floor = Literal["one", "schedule"]
FLOORS = ("one", "schedule")
CacheMode = Literal["off", "prefix", "dual"]
CACHE_MODES = ("off", "prefix", "dual")

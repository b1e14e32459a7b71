"""Fewer DiT evaluations: step caching (TeaCache, first-block cache) and CFG truncation.

A small layer around one step's CFG velocity, used by ``denoise`` only when switched on. Each step
it decides whether to run the DiT's blocks or to add the residual they produced at the last
computed step to this step's block input (embedding and final layer always run; they are cheap):

- ``teacache``: accumulate the rescaled relative L1 change of the first block's modulated input
  (``rescale(sum|cur - prev| / sum|prev|)``, a polynomial fitted per model); compute when the sum
  reaches the threshold, then restart it from zero (TeaCache, Liu et al. 2024).
- ``first_block``: always run block 0; run the others only when its residual changed by at least
  the threshold (relative L1) since the last computed step (ParaAttention / diffusers' FBCache).
- ``cfg_truncate F``: from step F * steps (rounded half up) on, the negative branch runs only every
  ``cfg_every``-th step; in between, v = cfg(v_pos, v_pos - d) with d = v_pos - v_neg of the last
  step that ran both.

The first ``warmup`` steps and the last step always run the blocks. Every rank takes the same
decision: the distances are sums over this rank's real tokens and batch rows, added over all ranks
by ``reduce`` (the parallel context's all-reduce) before they are compared, so Ulysses/ring shards,
tensor-parallel copies and the two CFG groups all see one number. With everything off ``denoise``
does not use this layer at all; with threshold 0 and no truncation it runs the same operations as
the plain path and gives bit-identical latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .scheduler import cfg_combine

# Step-Video-T2V's TeaCache rescaling polynomial (TeaCache4Step-Video), highest power first.
TEACACHE_STEPVIDEO = (6.74352814e3, -2.22814115e3, 2.55029094e2, -1.12338285e1, 2.84921593e-1)
MODES = ("none", "teacache", "first_block")
BRANCHES = ("pos", "neg")


@dataclass(frozen=True)
class CacheConfig:
    """What to reuse. The defaults change nothing (``enabled`` is False)."""

    mode: str = "none"
    threshold: float = 0.0
    warmup: int = 1
    cfg_truncate: float | None = None
    cfg_every: int = 4
    coefficients: tuple[float, ...] = TEACACHE_STEPVIDEO

    def __post_init__(self):
        object.__setattr__(self, "coefficients", tuple(self.coefficients))
        if self.mode not in MODES:
            raise ValueError(f"--cache must be one of {list(MODES)}, got {self.mode!r}")
        if self.threshold < 0:
            raise ValueError(f"--cache_threshold must be >= 0, got {self.threshold}")
        if self.warmup < 1:
            raise ValueError(f"--cache_warmup must be >= 1 (step 0 has nothing to reuse), "
                             f"got {self.warmup}")
        if self.cfg_truncate is not None and not 0 <= self.cfg_truncate <= 1:
            raise ValueError(f"--cfg_truncate is a fraction of the steps in [0, 1], "
                             f"got {self.cfg_truncate}")
        if self.cfg_every < 1:
            raise ValueError(f"--cfg_truncate_every must be >= 1, got {self.cfg_every}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none" or self.cfg_truncate is not None


def teacache_rescale(distance: float, coefficients=TEACACHE_STEPVIDEO) -> float:
    """The polynomial (numpy.poly1d order: highest power first) at ``distance``, by Horner."""
    out = 0.0
    for c in coefficients:
        out = out * distance + c
    return out


@dataclass
class AccumulatedDistance:
    """TeaCache's rule: add each step's distance; reuse while the sum stays below the threshold,
    compute (and restart from zero) when it reaches it. Threshold 0 never reuses."""

    threshold: float
    total: float = 0.0

    def should_compute(self, distance: float) -> bool:
        self.total += distance
        if self.threshold > 0 and self.total < self.threshold:
            return False
        self.total = 0.0
        return True

    def reset(self) -> None:
        self.total = 0.0


def negative_schedule(num_steps: int, cfg_truncate: float | None, every: int) -> list[bool]:
    """Per step: does the negative branch run? All steps before F * steps (rounded half up); from
    there on the first of every ``every`` steps."""
    start = num_steps if cfg_truncate is None else math.floor(cfg_truncate * num_steps + 0.5)
    return [i < start or (i - start) % every == 0 for i in range(num_steps)]


def _relative_l1(cur: torch.Tensor, prev: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """[sum |cur - prev|, sum |prev|] over real tokens, float64 (to be added over ranks)."""
    return [((cur - prev).abs() * valid).double().sum().item(),
            (prev.abs() * valid).double().sum().item()]


class StepCache:
    """The state of one sampling run (``num_steps`` steps); ``velocity`` replaces
    ``guided_velocity`` for step ``i``. ``reduce`` sums a float64 tensor over all ranks (identity
    on one process)."""

    def __init__(self, config: CacheConfig, num_steps: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config, self.num_steps = config, num_steps
        self.reduce = reduce or (lambda t: t)
        self.negative_due = negative_schedule(num_steps, config.cfg_truncate, config.cfg_every)
        self.rule = AccumulatedDistance(config.threshold)
        self.prev_input: torch.Tensor | None = None  # teacache: last step's first-block input
        self.first: dict[str, torch.Tensor] = {}  # first_block: block 0's residual, per branch
        self.residual: dict[str, torch.Tensor] = {}  # the skipped blocks' residual, per branch
        self.diff: torch.Tensor | None = None  # v_pos - v_neg of the last step that ran both
        self.evaluations, self.reused, self.negative_reused = 0, [], []

    def velocity(self, transformer, i: int, x: torch.Tensor, t: torch.Tensor, text,
                 guidance: float, cfg=None) -> torch.Tensor:
        """Step ``i``'s guided velocity; ``text`` is [positives, negatives], ``cfg`` this rank's
        ``parallel.CfgSplit`` (or None)."""
        both = self.negative_due[i]
        branches = BRANCHES if both else BRANCHES[:1]
        local = branches if cfg is None else branches[cfg.index:cfg.index + 1]
        e, h, v = None, None, None
        if local:
            e, h = self._embed(transformer, x, t, text, local)
        compute = self._decide(transformer, i, x, t, e, h, local)
        if e is not None:
            v = transformer.head(e, self._blocks(transformer, e, h, local, compute)).float()
        self.evaluations += len(branches) if compute else 0
        if not compute:
            self.reused.append(i)
        if not both:
            self.negative_reused.append(i)
        return self._combine(v, both, x, guidance, cfg)

    # --- the DiT, in parts ----------------------------------------------------------------

    def _embed(self, transformer, x, t, text, local):
        """Embed [x] * len(local) against the local branches' text; for first_block also run
        block 0. Returns (embedded, the input of the blocks that may be skipped)."""
        n = x.shape[0]
        if local != BRANCHES:
            text = text.select(slice(BRANCHES.index(local[0]) * n, (BRANCHES.index(local[-1]) + 1) * n))
        dtype = next(transformer.parameters()).dtype
        xx = torch.cat([x] * len(local)).to(dtype)
        e = transformer.embed(xx, t.expand(xx.shape[0]).float(), text.y, text.clip, text.mask)
        h = transformer.blocks(e, e.x, 0, 1) if self.config.mode == "first_block" else e.x
        return e, h

    def _blocks(self, transformer, e, h, local, compute: bool) -> torch.Tensor:
        start = 1 if self.config.mode == "first_block" else 0
        if compute:
            out = transformer.blocks(e, h, start)
            if self.config.mode != "none":
                self._store(self.residual, local, out - h)
            return out
        return h + torch.cat([self.residual[b] for b in local])

    @staticmethod
    def _store(store: dict, local, value: torch.Tensor) -> None:
        for b, part in zip(local, value.chunk(len(local))):
            store[b] = part

    # --- the decision (the same on every rank) ----------------------------------------------

    def _decide(self, transformer, i, x, t, e, h, local) -> bool:
        mode = self.config.mode
        if mode == "none":
            return True
        forced = i < self.config.warmup or i == self.num_steps - 1
        if mode == "teacache":
            return self._teacache(transformer, x, t, forced)
        return self._first_block(transformer, e, h, local, forced)

    def _teacache(self, transformer, x, t, forced: bool) -> bool:
        dtype = next(transformer.parameters()).dtype
        cur = transformer.first_block_input(x.to(dtype), t.float())  # (B, S, D), padding zeroed
        prev, self.prev_input = self.prev_input, cur
        if forced:
            self.rule.reset()
            return True
        diff, ref = self.reduce(torch.tensor(_relative_l1(cur, prev, 1), dtype=torch.float64)).tolist()
        distance = diff / ref if ref > 0 else float("inf")
        return self.rule.should_compute(teacache_rescale(distance, self.config.coefficients))

    def _first_block(self, transformer, e, h, local, forced: bool) -> bool:
        """Relative L1 change of block 0's residual against the last computed step. A rank with
        no branch this step (CFG group 1 under truncation) adds zeros."""
        r1 = None if e is None else h - e.x
        if forced:
            if r1 is not None:
                self._store(self.first, local, r1)
            return True
        sums = [0.0, 0.0, 0.0]  # sum |r1 - prev|, sum |prev|, branches with nothing stored
        if r1 is not None:
            if all(b in self.first for b in local):
                prev = torch.cat([self.first[b] for b in local])
                sums[:2] = _relative_l1(r1, prev, transformer.valid_tokens(e))
            else:
                sums[2] = 1.0
        diff, ref, missing = self.reduce(torch.tensor(sums, dtype=torch.float64)).tolist()
        compute = missing > 0 or ref == 0 or diff / ref >= self.config.threshold
        if compute and r1 is not None:
            self._store(self.first, local, r1)
        return compute

    # --- CFG ------------------------------------------------------------------------------

    def _combine(self, v, both: bool, x, guidance: float, cfg) -> torch.Tensor:
        if cfg is not None:
            v = cfg.gather(v) if both else cfg.share_positive(v, like=x)
        if both:
            v_pos, v_neg = v.chunk(2)
            if self.config.cfg_truncate is not None:
                self.diff = v_pos - v_neg
            return cfg_combine(v_pos, v_neg, guidance)
        return cfg_combine(v, v - self.diff, guidance)

    # --- what ran -------------------------------------------------------------------------

    def summary(self, done: int) -> str:
        """The progress bar's note after ``done`` steps: DiT evaluations so far / the exact path's,
        and the steps reused so far (their indices are in the sidecar)."""
        return f"DiT evals {self.evaluations}/{2 * done}, reused {len(self.reused)}"

    def report(self) -> dict:
        """For the sidecar: evaluations (one branch of one step = one) and the reused steps."""
        return stats_record(self.config, self.num_steps, self.evaluations, self.reused,
                            self.negative_reused)


def stats_record(config: CacheConfig, num_steps: int, evaluations: int | None = None,
                 reused=(), negative_reused=()) -> dict:
    """The sidecar's ``cache`` entry; with only the first two arguments, the exact path's."""
    return {
        "mode": config.mode, "threshold": config.threshold, "warmup": config.warmup,
        "cfg_truncate": config.cfg_truncate, "cfg_every": config.cfg_every,
        "dit_evaluations": 2 * num_steps if evaluations is None else evaluations,
        "dit_evaluations_exact": 2 * num_steps,
        "full_steps": num_steps - len(reused),
        "reused_steps": list(reused), "negative_reused_steps": list(negative_reused),
    }

"""Flow-matching sampler: pure functions, and the public ``FlowMatchDiscreteScheduler`` API.

Model time runs 0 = noise -> 1 = data (reverse=False, the released scheduler config).
"""

from __future__ import annotations

import os

import torch


def flow_sigmas(num_steps: int, shift: float, reverse: bool = False) -> torch.Tensor:
    """Time-shifted schedule of ``num_steps + 1`` float32 values.

    s = linspace(1, 0, n+1); s' = shift*s / (1 + (shift-1)*s); reverse=False returns 1 - s'.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"time_shift must be > 0, got {shift}")
    s = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    s = shift * s / (1 + (shift - 1) * s)
    return s if reverse else 1 - s


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
               sigma_next: float | torch.Tensor) -> torch.Tensor:
    """x + v * (sigma_next - sigma), in float32."""
    return x.float() + v.float() * (sigma_next - sigma)


def cfg_combine(v_pos: torch.Tensor, v_neg: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_neg + g * (v_pos - v_neg)."""
    return v_neg + guidance * (v_pos - v_neg)


class FlowMatchDiscreteScheduler:
    """Euler flow-matching scheduler with the public release's call forms."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, reverse: bool = False,
                 solver: str = "euler", **ignored):
        if solver != "euler":
            raise ValueError(f"solver {solver!r} is not supported; the released scheduler uses 'euler'")
        self.num_train_timesteps = num_train_timesteps
        self.reverse = reverse
        self.sigmas = torch.empty(0)
        self.timesteps = torch.empty(0)
        self._step_index: int | None = None

    @classmethod
    def from_config_file(cls, path: str) -> "FlowMatchDiscreteScheduler":
        from ..weights import read_json

        return cls(**read_json(path, "scheduler config"))

    def set_timesteps(self, num_inference_steps: int, time_shift: float = 13.0,
                      device: torch.device | str | None = None) -> None:
        self.sigmas = flow_sigmas(num_inference_steps, time_shift, self.reverse).to(device)
        self.timesteps = self.sigmas[:-1]
        self._step_index = None

    def _index_of(self, timestep: torch.Tensor | float) -> int:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0].to(self.timesteps.device)
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t)} is not in the schedule; call set_timesteps first")
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float,
             sample: torch.Tensor, return_dict: bool = False):
        """One Euler step; the first call locates ``timestep`` in the schedule, later calls advance."""
        if self._step_index is None:
            self._step_index = self._index_of(timestep)
        i = self._step_index
        prev = euler_step(sample, model_output, self.sigmas[i], self.sigmas[i + 1])
        self._step_index += 1
        return {"prev_sample": prev} if return_dict else prev


def load_scheduler(model_dir: str) -> FlowMatchDiscreteScheduler:
    """The scheduler of ``model_dir/scheduler/scheduler_config.json``; the released defaults when a
    directory has none (bare transformer folders). Turbo uses the same format."""
    from ..layout import SCHEDULER, part_dir

    path = os.path.join(part_dir(SCHEDULER, model_dir), SCHEDULER.config)
    if os.path.isfile(path):
        return FlowMatchDiscreteScheduler.from_config_file(path)
    return FlowMatchDiscreteScheduler()

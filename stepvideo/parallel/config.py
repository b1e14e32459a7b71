"""Parallel degrees, validated before any weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """world size = ulysses x ring x tensor_parallel x cfg.

    Ranks are laid out with ulysses innermost: rank = ((cfg_i * tp + tp_i) * ring + ring_i) * ulysses + u_i.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    tensor_parallel_degree: int = 1
    cfg_degree: int = 1

    def __post_init__(self):
        for name in ("ulysses_degree", "ring_degree", "tensor_parallel_degree", "cfg_degree"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"CFG parallelism splits [positive, negative] over 2 groups; cfg degree "
                             f"must be 1 or 2, got {self.cfg_degree}")

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree * self.tensor_parallel_degree * self.cfg_degree

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def validate(self, world_size: int, num_heads: int) -> None:
        """Raise ValueError with the numbers when the degrees do not fit the job."""
        if self.world_size != world_size:
            raise ValueError(
                f"world size {world_size} != ulysses {self.ulysses_degree} x ring {self.ring_degree} "
                f"x tensor_parallel {self.tensor_parallel_degree} x cfg {self.cfg_degree} = "
                f"{self.world_size}; set the degrees so their product is --nproc_per_node")
        split = self.ulysses_degree * self.tensor_parallel_degree
        if num_heads % split:
            fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"{num_heads} heads are not divisible by ulysses degree {self.ulysses_degree} x "
                f"tensor parallel degree {self.tensor_parallel_degree} = {split}; use a product in {fits}")

    def coords(self, rank: int) -> dict[str, int]:
        u, r, t = self.ulysses_degree, self.ring_degree, self.tensor_parallel_degree
        return {"ulysses": rank % u, "ring": rank // u % r, "tp": rank // (u * r) % t,
                "cfg": rank // (u * r * t)}

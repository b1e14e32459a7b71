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

    def node_layout_note(self, local_world_size: int, world_size: int) -> str | None:
        """Why this layout sends the Ulysses all-to-all between nodes, or None when it does not.

        Ulysses is innermost, so its groups are runs of ``ulysses_degree`` consecutive ranks, and
        torchrun gives each node a run of ``local_world_size`` consecutive ranks: every Ulysses
        group stays in one node exactly when ``ulysses_degree`` divides ``local_world_size``.
        Ring, tensor-parallel and CFG groups may span nodes (a ring passes K/V blocks to one
        neighbour; CFG exchanges one velocity per step). Tensor parallelism all-reduces every
        block, so it should stay inside a node too: the same rule for ``ulysses x tp``."""
        if local_world_size >= world_size:
            return None
        u, t = self.ulysses_degree, self.tensor_parallel_degree
        if u > 1 and local_world_size % u:
            fits = [d for d in range(2, local_world_size + 1) if local_world_size % d == 0]
            return (f"ulysses degree {u} does not divide the {local_world_size} processes per "
                    f"node, so Ulysses groups span nodes and their all-to-all crosses the "
                    f"network; use a ulysses degree in {fits or [1]} and put the rest in "
                    "--ring_degree or --cfg_parallel")
        if t > 1 and local_world_size % (u * t):
            return (f"ulysses {u} x tensor_parallel {t} = {u * t} does not divide the "
                    f"{local_world_size} processes per node, so tensor-parallel groups span "
                    "nodes and all-reduce over the network in every block; lower "
                    "--tensor_parallel_degree or use --ring_degree / --cfg_parallel across nodes")
        return None

    def coords(self, rank: int) -> dict[str, int]:
        u, r, t = self.ulysses_degree, self.ring_degree, self.tensor_parallel_degree
        return {"ulysses": rank % u, "ring": rank // u % r, "tp": rank // (u * r) % t,
                "cfg": rank // (u * r * t)}

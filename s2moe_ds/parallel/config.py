"""Where the model's pieces live across processes: kept apart from the architecture, so a
checkpoint can record both and a run can say which of the two changed."""

from dataclasses import asdict, dataclass

from ..config import check_int


@dataclass
class ParallelConfig:
    """The parallel layout of a run."""

    ep_size: int = 1
    """Expert-parallel ranks per MoE layer: each holds moe.num_experts / ep_size experts and tokens
    reach them by all-to-all. Must divide moe.num_experts and the world size; keep it within a node."""

    def __post_init__(self) -> None:
        check_int(self.ep_size, "parallel.ep_size", 1)

    def to_dict(self) -> dict:
        return asdict(self)

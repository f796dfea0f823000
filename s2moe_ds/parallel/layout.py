"""Which experts this rank holds: rank -> expert-parallel rank, and global <-> local expert ids.

The expert-parallel rank is read from DeepSpeed's own process groups (created here with DeepSpeed's
function when absent, so the engine later finds the same groups), never assumed from the global
rank. A local expert i of expert-parallel rank r is the global expert r * num_local + i: DeepSpeed
names its per-expert checkpoint files and their keys by that global id, and every place that needs
the mapping asks an ExpertLayout.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import ConfigError
from . import deepspeed_internals as ds


def check_expert_parallel(num_experts: int, ep_size: int, experts_field: str = "moe.num_experts",
                          ep_field: str = "parallel.ep_size") -> None:
    if num_experts % ep_size:
        raise ConfigError(f"{experts_field}: must be divisible by {ep_field} (got num_experts={num_experts}, "
                          f"ep_size={ep_size}); each expert-parallel rank holds num_experts / ep_size experts")


@dataclass(frozen=True)
class ExpertLayout:
    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0

    def __post_init__(self) -> None:
        check_expert_parallel(self.num_experts, self.ep_size, "num_experts", "ep_size")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ConfigError(f"ep_rank: must be in [0, {self.ep_size}), got {self.ep_rank}")

    @classmethod
    def from_process_groups(cls, num_experts: int, ep_size: int,
                            ds_config: Optional[Dict] = None) -> "ExpertLayout":
        """This rank's layout in DeepSpeed's expert-parallel groups (created now if absent, with
        the DeepSpeed config's topology). ep_size 1 needs no process group."""
        if ep_size == 1:
            return cls(num_experts, 1, 0)
        name = ds.ensure_expert_groups(ep_size, ds.use_data_before_expert_parallel(ds_config or {}))
        return cls(num_experts, ds.expert_parallel_world_size(name), ds.expert_parallel_rank(name))

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    def global_id(self, local_id: int) -> int:
        return self.ep_rank * self.num_local + local_id

    def global_ids(self) -> List[int]:
        return [self.global_id(i) for i in range(self.num_local)]

    def global_param_name(self, name: str) -> str:
        """The ep_size-1 name of a parameter of this rank's layer: local expert index -> global."""
        head, sep, rest = name.partition(ds.EXPERT_PARAM_PREFIX)
        if not sep:
            return name
        index, dot, tail = rest.partition(".")
        return f"{head}{sep}{self.global_id(int(index))}{dot}{tail}"

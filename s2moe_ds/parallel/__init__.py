"""Process start-up, the DeepSpeed config, the parallel layout, and DeepSpeed's private names.

Nothing here knows a model, a block or a loop: models take a ParallelConfig, blocks ask an
ExpertLayout, and every touch of DeepSpeed's internals goes through deepspeed_internals.
"""

from .config import ParallelConfig
from .layout import ExpertLayout, check_expert_parallel
from .setup import (check_ds_batch, check_ds_config, free_port, init_distributed, initialize, keep_global_batch, launcher_world_size,
                    load_ds_config)

__all__ = ["ParallelConfig", "ExpertLayout", "check_expert_parallel", "check_ds_batch", "check_ds_config", "free_port",
           "init_distributed", "initialize", "keep_global_batch", "launcher_world_size", "load_ds_config"]

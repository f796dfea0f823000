"""DeepSpeed start-up and (later) the training loop, checkpoints and metrics."""

from .deepspeed_setup import check_ds_config, free_port, init_distributed, initialize, load_ds_config

__all__ = ["check_ds_config", "free_port", "init_distributed", "initialize", "load_ds_config"]

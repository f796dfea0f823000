"""Checkpoint storage (crash-consistent saves, exact resume), consolidation to one process, and the
reading of earlier formats. Used by training, evaluation and the launch scripts; imports models
and parallel, never train or eval."""

from .compat import FORMAT_VERSION, upgrade_meta, upgrade_model_config
from .consolidate import consolidate, load_global_state, load_model, model_config_for_inference, model_from_state, resolve_checkpoint
from .safe_load import UnsafeCheckpointError, check_step_folder, load_file
from . import reshard
from .manifest import MANIFEST, CorruptCheckpointError
from .store import (COMPLETE, LATEST, CheckpointWriteError, check_resumable, complete_tags, latest_tag, load,
                    load_rank_state, newest_verified, read_meta, save, set_aside, step_tag, tag_step)

__all__ = ["COMPLETE", "FORMAT_VERSION", "LATEST", "MANIFEST", "CheckpointWriteError", "CorruptCheckpointError",
           "complete_tags", "newest_verified", "check_resumable", "read_meta", "reshard", "consolidate", "latest_tag", "load",
           "load_global_state", "load_model", "load_rank_state", "model_config_for_inference", "model_from_state", "resolve_checkpoint", "save", "set_aside", "step_tag", "tag_step",
           "upgrade_meta", "upgrade_model_config", "UnsafeCheckpointError", "check_step_folder", "load_file"]

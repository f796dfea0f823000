"""Host synchronisations per optimizer step: on a GPU each read of a tensor's value on the host
(.item(), .tolist(), float(t), ...) waits for every kernel queued before it, and each collective the
trainer starts is another point where all ranks meet. The trainer and its task read once and meet
once per optimizer step, whatever gradient_accumulation_steps is: the step's losses, their verdict
(finite, no spike) and the stop-signal vote travel together.

Counted: reads of tensor values and deepspeed.comm collectives made by the trainer, the task and
the hooks between the start of one optimizer step and the start of the next. Not counted: what
DeepSpeed's engine does inside forward (the model, its routers: some do an .item() to size their
capacity), backward and step (gradient reduction, clipping): the engine's own, reported apart.
Logging, evaluation and checkpoint steps are left out (they read per interval)."""

import contextlib
from collections import defaultdict

import torch

from s2moe_ds.train import TrainerHook

from ..harness import run_distributed
from ..runs import TEXT, _ds_config, _experiment

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__bool__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather", "all_to_all_single", "reduce_scatter_fn", "allgather_fn")
ENGINE_CALLS = ("forward", "backward", "step")


class HostSyncCounter(TrainerHook):
    """Per optimizer step: {'reads', 'collectives'} made outside the engine, and the engine's own
    by call ('forward_reads', 'step_collectives', ...). Use as a context manager around the run."""

    def __init__(self):
        self.counts = defaultdict(lambda: defaultdict(int))
        self.step = None
        self.inside_engine = []
        self._undo = []

    def _count(self, kind):
        if self.step is not None:
            self.counts[self.step][(f"{self.inside_engine[0]}_" if self.inside_engine else "") + kind] += 1

    def _wrap(self, owner, name, kind):
        original = getattr(owner, name)
        own = name in vars(owner)

        def counting(*args, **kwargs):
            self._count(kind)
            return original(*args, **kwargs)
        setattr(owner, name, counting)
        self._undo.append(lambda: setattr(owner, name, original) if own else delattr(owner, name))

    def __enter__(self):
        import deepspeed.comm as dist
        for name in READS:
            self._wrap(torch.Tensor, name, "reads")
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._wrap(dist, name, "collectives")
        return self

    def __exit__(self, *exc):
        self.step = None
        for undo in reversed(self._undo):
            undo()

    def on_step_start(self, trainer, step):
        if self.step is None:
            for name in ENGINE_CALLS:
                self._mark_engine_call(trainer.engine, name)
        self.step = step

    def _mark_engine_call(self, engine, name):
        original = getattr(engine, name)

        def inside(*args, **kwargs):
            self.inside_engine.append(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.inside_engine.pop()
        setattr(engine, name, inside)

    def after_evaluation(self, trainer, step, split, result):
        self.counts[step]["evaluated"] = 1

    def after_checkpoint(self, trainer, step, path):
        self.counts[step]["saved"] = 1


def plain_steps(counts, max_steps):
    """The counts of the steps that neither log, evaluate nor save: every one before the last."""
    return {s: dict(c) for s, c in counts.items() if s < max_steps and "evaluated" not in c and "saved" not in c}


def _counting_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.train import pretrain
    from s2moe_ds.train import model_preset
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4))
    experiment = _experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=32, max_steps=4,
                             warmup_steps=1, eval_interval=0, save_interval=0, log_interval=10**6)
    with HostSyncCounter() as counter:
        final = pretrain(experiment, _ds_config(), hooks=[counter])
    return {"steps": plain_steps(counter.counts, 4), "losses": final["losses"]}


def test_one_read_and_one_collective_per_optimizer_step(tmp_path):
    """gradient_accumulation_steps 2 on 2 processes: was 5 reads and 3 collectives a step."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    results = run_distributed(_counting_worker, 2, (str(text), str(tmp_path / "run"), str(tmp_path / "cache")))
    for r in results:
        assert sorted(r["steps"]) == [1, 2, 3]
        for step, c in r["steps"].items():
            assert c.get("reads", 0) <= 1 and c.get("collectives", 0) <= 1, (step, c)
        assert len(r["losses"]) == 4 and all(loss == loss for loss in r["losses"])

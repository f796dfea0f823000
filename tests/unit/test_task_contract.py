"""The task contract: the trainer calls a Task's methods and nothing else of a task, both tasks
implement every one of them with their shared parts in one place, and ExperimentConfig names its
task (records written before the field are language modelling)."""

import ast
import inspect
import os

import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.data import ClassificationDataConfig, DataConfig
from s2moe_ds.train import ExperimentConfig, LanguageModelingTask, Task, Trainer, apply_overrides, preset
from s2moe_ds.train.finetune import ClassificationTask, FinetuneConfig

TRAINER = os.path.join(os.path.dirname(inspect.getfile(Trainer)), "trainer.py")


def _task_attributes_the_trainer_uses():
    """Every name the trainer reads from its task: self.task.<name>."""
    names = set()
    for node in ast.walk(ast.parse(open(TRAINER).read())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "task" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _classification_task():
    return ClassificationTask(FinetuneConfig(pretrained="runs/tiny", data=ClassificationDataConfig(dataset="sst2")))


def test_the_trainer_calls_only_what_the_contract_defines():
    used = _task_attributes_the_trainer_uses()
    assert {"prepare", "forward", "loss", "next_batch", "evaluate", "state_dict"} <= used, used
    contract = {name for name in dir(Task) if not name.startswith("_")}
    assert used <= contract, f"the trainer calls {sorted(used - contract)}, which Task does not define"
    for name in used:  # each one documented where it is defined
        assert inspect.getdoc(getattr(Task, name)), name


def test_both_tasks_implement_the_contract_and_share_its_common_parts():
    tasks = [LanguageModelingTask(DataConfig(), seq_len=8), _classification_task()]
    assert [t.name for t in tasks] == ["lm", "classification"]
    for task in tasks:
        assert isinstance(task, Task)
        # One loss, one data position and one default per-rank state for both.
        for name in ("loss", "state_dict", "load_state_dict"):
            assert getattr(type(task), name) is getattr(Task, name), (type(task).__name__, name)
    with pytest.raises(TypeError, match="abstract"):
        Task()


def test_experiment_config_names_its_task():
    assert ExperimentConfig().task == "lm" and ExperimentConfig().data == DataConfig()
    classification = ExperimentConfig(task="classification")
    assert classification.data is None and classification.to_dict()["task"] == "classification"
    # A run record of before the field (no 'task') is language modelling.
    record = ExperimentConfig().to_dict()
    del record["task"]
    assert ExperimentConfig(**record).task == "lm"


@pytest.mark.parametrize("make, message", [
    (lambda: ExperimentConfig(task="translation"),
     "task: must be 'lm' (language modelling, launch/pretrain.py) or 'classification' (fine-tuning, "
     "launch/finetune.py), got 'translation'"),
    (lambda: ExperimentConfig(task="classification", data=DataConfig()),
     "data: the classification task reads no corpus (its labelled texts are FinetuneConfig.data"),
    (lambda: apply_overrides(ExperimentConfig(task="classification"), {"data": {"dataset": "enwik8"}}),
     "data: the classification task reads no corpus"),
    (lambda: Trainer(ExperimentConfig(task="classification"), {}),
     "task: the classification task is built from its own settings (FinetuneConfig): run it with "
     "s2moe_ds.train.finetune.finetune()"),
    (lambda: Trainer(preset("tiny"), {}, task=_classification_task()),
     "task: the experiment's task is 'lm' but the task given trains 'classification'; set "
     "ExperimentConfig(task='classification')"),
])
def test_a_task_that_does_not_fit_is_named_with_the_fix(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value).startswith(message), str(info.value)


def test_a_task_outside_the_contract_is_refused_before_compute():
    class DuckTask:
        name = "lm"

    with pytest.raises(TypeError, match="DuckTask is not a s2moe_ds.train.Task; subclass Task"):
        Trainer(preset("tiny"), {}, task=DuckTask())


def test_fine_tuning_passes_no_corpus_settings(monkeypatch):
    import s2moe_ds.train.finetune as finetune
    monkeypatch.setattr(finetune, "pretrained_meta", lambda path: {"model_config": preset("tiny").model.to_dict()})
    cfg = FinetuneConfig(pretrained="runs/tiny", data=ClassificationDataConfig(dataset="sst2"))
    experiment = finetune.finetune_experiment(cfg, {}, {"out_dir": "runs/ft"})
    assert experiment.task == "classification" and experiment.data is None
    assert isinstance(Trainer(experiment, {}, task=_classification_task()).task, ClassificationTask)

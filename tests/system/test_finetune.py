"""Fine-tuning (launch/finetune.py, train/finetune.py): labelled texts from CSV, JSONL and
save_to_disk folders (and hub names, through a stand-in for the hub), truncation, padding masked
everywhere, every bad input refused before compute, and on gloo processes: accuracy above chance,
exact resume, and a checkpoint of 2 processes fine-tuned on 1 and on 2 with the same evaluation."""

import csv
import json
import os
import random

import numpy as np
import pytest
import torch

from s2moe_ds.config import ConfigError
from s2moe_ds.data import ByteTokenizer, ClassificationDataConfig, load_classification
from s2moe_ds.data.classification import ExampleBatchSampler, truncate
from s2moe_ds.models import ClassifierConfig, ModelConfig, SequenceClassifier, build_model
from s2moe_ds.parallel import ExpertLayout
from s2moe_ds.checkpoint import load_global_state

from ..harness import run_distributed
from .test_pretrain import TEXT

POSITIVE = ["best", "wisdom", "hope", "Light", "belief"]
NEGATIVE = ["worst", "foolishness", "despair", "Darkness", "incredulity"]
FILLER = ["it", "was", "the", "age", "of", "times", "season", "epoch", "spring", "winter"]


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if y else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    return rows


def _write(folder, kind, splits, text="text", label="label"):
    os.makedirs(folder, exist_ok=True)
    for split, rows in splits.items():
        path = os.path.join(folder, f"{split}.{kind}")
        if kind == "csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=[text, label])
                w.writeheader()
                for r in rows:
                    w.writerow({text: r["text"], label: r["label"]})
        else:
            with open(path, "w") as f:
                for r in rows:
                    f.write(json.dumps({text: r["text"], label: r["label"]}) + "\n")
    return folder


@pytest.fixture
def splits():
    return {"train": _rows(300, 1), "valid": _rows(60, 2), "test": _rows(60, 3)}


def _load(path, **kw):
    return load_classification(ClassificationDataConfig(dataset=kw.pop("dataset", "files"), path=path, **kw),
                               ByteTokenizer(), kw.pop("max_seq_len", 64))


def test_csv_jsonl_and_save_to_disk_give_the_same_examples(tmp_path, splits):
    import datasets
    a = _load(_write(str(tmp_path / "csv"), "csv", splits))
    b = _load(_write(str(tmp_path / "jsonl"), "jsonl", splits))
    saved = str(tmp_path / "saved")
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in
                          (("train", splits["train"]), ("validation", splits["valid"]), ("test", splits["test"]))}
                         ).save_to_disk(saved)
    c = _load(saved)
    assert a.label_names == b.label_names == c.label_names == ("neg", "pos")
    for split in ("train", "valid", "test"):
        for other in (b, c):
            assert [list(x) for x in a.splits[split].ids] == [list(x) for x in other.splits[split].ids]
            assert a.splits[split].labels_N.tolist() == other.splits[split].labels_N.tolist()
    assert a.identity["sha256"] == b.identity["sha256"] == c.identity["sha256"]
    first = splits["train"][0]
    assert bytes(a.splits["train"].ids[0].astype(np.uint8)).decode() == first["text"]
    assert a.splits["train"].labels_N[0] == ("neg", "pos").index(first["label"])


def test_columns_labels_and_truncation_are_configurable(tmp_path, splits):
    folder = _write(str(tmp_path / "d"), "jsonl", splits, text="sentence", label="sentiment")
    data = _load(folder, text_column="sentence", label_column="sentiment", labels=["pos", "neg"], max_len=5,
                 truncation="tail")
    assert data.label_names == ("pos", "neg")
    assert data.splits["train"].labels_N[0] == ["pos", "neg"].index(splits["train"][0]["label"])
    assert max(len(x) for x in data.splits["train"].ids) == 5
    assert bytes(data.splits["train"].ids[0].astype(np.uint8)).decode() == splits["train"][0]["text"][-5:]
    ids = np.arange(20)
    assert truncate(ids, 8, "head").tolist() == list(range(8))
    assert truncate(ids, 8, "tail").tolist() == list(range(12, 20))
    assert truncate(ids, 8, "head_tail").tolist() == [0, 1] + list(range(14, 20))
    assert truncate(ids[:5], 8, "head_tail").tolist() == list(range(5))


def test_hub_names_map_their_splits_columns_and_label_names(tmp_path, monkeypatch):
    import datasets
    names = datasets.ClassLabel(names=["negative", "positive"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": names})
    rows = [{"sentence": f"text {i}", "label": i % 2} for i in range(40)]
    hub = {"stanfordnlp/sst2": datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows, features=features),
        "validation": datasets.Dataset.from_list(rows[:10], features=features),
        "test": datasets.Dataset.from_list([{"sentence": "hidden", "label": -1}], features=features)}),
        "stanfordnlp/imdb": datasets.DatasetDict({
            "train": datasets.Dataset.from_list([{"text": r["sentence"], "label": r["label"]} for r in rows]),
            "test": datasets.Dataset.from_list([{"text": "x", "label": 1}])})}
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: asked.append(name) or hub[name])
    sst2 = load_classification(ClassificationDataConfig(dataset="sst2"), ByteTokenizer(), 64)
    assert asked == ["stanfordnlp/sst2"] and sst2.label_names == ("negative", "positive")
    # GLUE hides SST-2's test labels: its validation split is the one reported.
    assert set(sst2.splits) == {"train", "valid"} and len(sst2.splits["valid"]) == 10
    imdb = load_classification(ClassificationDataConfig(dataset="imdb", valid_fraction=0.25), ByteTokenizer(), 64)
    assert len(imdb.splits["valid"]) == 10 and len(imdb.splits["train"]) == 30 and len(imdb.splits["test"]) == 1
    assert imdb.label_names == ("0", "1")


def test_shakespeare_speakers_become_labelled_speeches(tmp_path):
    lines = []
    for i in range(60):
        who = ["ROMEO", "JULIET", "NURSE", "First Citizen"][i % 4]
        lines.append(f"{who}:\nSpeech number {i} of {who.lower()}.\n")
    path = tmp_path / "play.txt"
    path.write_text("\n".join(lines))
    data = load_classification(ClassificationDataConfig(dataset="shakespeare-speakers", path=str(path), speakers=3),
                               ByteTokenizer(), 64)
    assert data.label_names == ("First Citizen", "JULIET", "NURSE")  # the 3 most frequent, ties by name
    assert sum(len(s) for s in data.splits.values()) == 45
    assert [len(data.splits[s]) for s in ("train", "valid", "test")] == [36, 4, 5]


def _bad_inputs(tmp_path, splits):
    good = _write(str(tmp_path / "good"), "jsonl", splits)
    no_col = _write(str(tmp_path / "nocol"), "csv", splits, text="body")
    unknown = _write(str(tmp_path / "unknown"), "jsonl", {**splits, "test": splits["test"] + [{"text": "x", "label": "meh"}]})
    broken = _write(str(tmp_path / "broken"), "jsonl", splits)
    with open(os.path.join(broken, "valid.jsonl"), "a") as f:
        f.write("{not json\n")
    empty = _write(str(tmp_path / "empty"), "jsonl", {**splits, "train": splits["train"] + [{"text": " ", "label": "pos"}]})
    no_train = _write(str(tmp_path / "notrain"), "jsonl", {"valid": splits["valid"]})
    return [
        (dict(path=no_col), ["nocol/train.csv", "'text'", "--text-column"]),
        (dict(path=unknown), ["unknown/test.jsonl", "'label'", "row 61", "'meh'", "--labels"]),
        (dict(path=good, labels=["pos", "neutral"]), ["train.jsonl", "'neg'"]),
        (dict(path=broken), ["broken/valid.jsonl line 61", "not JSON"]),
        (dict(path=empty), ["empty/train.jsonl", "row 301", "empty"]),
        (dict(path=no_train), ["notrain", "no train file"]),
        (dict(path=good, max_len=65), ["finetune.data.max_len", "64"]),
        (dict(path=str(tmp_path / "missing")), ["finetune.data.path", "does not exist"]),
        (dict(path=good, dataset="sst2"), ["no save_to_disk folder", "sst2"]),
        (dict(path=good, truncation="middle"), ["finetune.data.truncation"]),
    ]


def test_bad_data_is_refused_naming_the_file_and_the_fix(tmp_path, splits):
    for kw, parts in _bad_inputs(tmp_path, splits):
        with pytest.raises(ConfigError) as e:
            _load(**kw)
        for part in parts:
            assert part in str(e.value), (kw, str(e.value))


def test_sampler_shares_each_batch_and_resumes_exactly():
    ranks = [ExampleBatchSampler(50, 4, r, 2, seed=3) for r in range(2)]
    seen = [np.concatenate([s.next_indices() for s in ranks]) for _ in range(6)]
    assert all(len(set(b)) == 8 for b in seen) and len(set(np.concatenate(seen))) == 48
    again = ExampleBatchSampler(50, 4, 0, 2, seed=3)
    again.load_state_dict(ranks[0].state_dict())
    assert again.next_indices().tolist() == ranks[0].next_indices().tolist()
    with pytest.raises(ConfigError, match="global_batch"):
        ExampleBatchSampler(50, 2, 0, 2, seed=3).load_state_dict(ranks[0].state_dict())


def _tiny(backbone="gpt", block="s2moe"):
    extra = {"backbone_config": {"mem_len": 8}} if backbone == "txl" else {}
    # No capacity: DeepSpeed's top-2 gate has no padding mask, so with drops padding could take a
    # real token's slot; without them padding changes nothing.
    return ModelConfig(backbone=backbone, n_layer=2, d_model=32, n_head=4, d_inner=64, max_seq_len=16,
                       moe=dict(block=block, num_experts=4, k=2, drop_tokens=False), **extra)


@pytest.mark.parametrize("backbone", ["gpt", "txl"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_is_masked_everywhere(backbone, pooling):
    """Training loss and gradients (S2MoE's noise statistics and InfoNCE sample included) do not
    depend on what the padding holds, and each text classifies alone as in a padded batch."""
    torch.manual_seed(0)
    model = SequenceClassifier(_tiny(backbone), ClassifierConfig(num_labels=3, pooling=pooling))
    x_BT = torch.randint(0, 256, (4, 12))
    mask_BT = torch.ones(4, 12, dtype=torch.long)
    for b, n in enumerate((12, 9, 5, 2)):
        mask_BT[b, n:] = 0
    y_B = torch.tensor([0, 1, 2, 1])

    def loss_and_grads(pad_value):
        x = torch.where(mask_BT.bool(), x_BT, torch.full_like(x_BT, pad_value))
        model.zero_grad()
        torch.manual_seed(5)
        out = model(x, y_B, mask_BT)
        total = out.task_loss + sum(sum(v) for v in out.layer_losses.values())
        total.backward()
        return total.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    loss0, grads0 = loss_and_grads(0)
    loss1, grads1 = loss_and_grads(200)
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        batch = model(x_BT, None, mask_BT).logits
        for b, n in enumerate((12, 9, 5, 2)):
            torch.testing.assert_close(model(x_BT[b:b + 1, :n]).logits[0], batch[b], atol=1e-5, rtol=1e-5)


def test_a_language_models_weights_load_into_the_classifier_on_any_layout():
    torch.manual_seed(0)
    lm = build_model(_tiny())
    state = lm.state_dict()
    from s2moe_ds.parallel import ParallelConfig
    for ep_rank in (0, 1):
        clf = SequenceClassifier(_tiny(), ClassifierConfig(), ParallelConfig(ep_size=2))
        layout = ExpertLayout(4, 2, ep_rank)
        load_global_state(clf.backbone, state, layout, "test")
        own = clf.backbone.state_dict()
        for name, value in own.items():
            torch.testing.assert_close(value, state[layout.global_param_name(name)])
    other = SequenceClassifier(ModelConfig(n_layer=1, d_model=32, n_head=4, d_inner=64, max_seq_len=16,
                                           moe=dict(num_experts=4)), ClassifierConfig())
    with pytest.raises(ConfigError, match="do not fit this model"):
        load_global_state(other.backbone, state, ExpertLayout(4), "finetune.pretrained: somewhere")


# ------------------------------------------------------------------------- on gloo processes

def _ds_config(lr=3e-3):
    return {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}


def _pretrain_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.data import DataConfig
    from s2moe_ds.parallel import ParallelConfig
    from s2moe_ds.train import ExperimentConfig, TrainConfig, model_preset, pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4))
    experiment = ExperimentConfig(model=model, parallel=ParallelConfig(ep_size=world_size),
                                  data=DataConfig(dataset="path", path=text, cache_dir=cache),
                                  train=TrainConfig(out_dir=out_dir, seq_len=32, max_steps=20, warmup_steps=2,
                                                    eval_interval=0, save_interval=0))
    return pretrain(experiment, _ds_config(), task=None)["step"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny S2MoE language model pretrained on 2 processes with ep_size 2."""
    root = tmp_path_factory.mktemp("pretrained")
    text = root / "corpus.txt"
    text.write_text(TEXT + " ".join(POSITIVE + NEGATIVE + FILLER) + "\n")
    run_distributed(_pretrain_worker, 2, (str(text), str(root / "run"), str(root / "cache")))
    return str(root / "run")


def _finetune_worker(rank, world_size, pretrained, data, out_dir, train_kw, lr, overrides):
    from s2moe_ds.train.finetune import FinetuneConfig, finetune, finetune_experiment
    cfg = FinetuneConfig(pretrained=pretrained, data=ClassificationDataConfig(path=data), moe_overrides=overrides)
    experiment = finetune_experiment(cfg, {"ep_size": world_size},
                                     {"out_dir": out_dir, "warmup_steps": 5, "log_interval": 1, **train_kw})
    final = finetune(cfg, experiment, _ds_config(lr))
    return {"losses": final["losses"], "report": final.get("report"), "step": final["step"]}


def _scores(report):
    return {(r["split"], r["eval_k"]): (r["accuracy"], r["loss"]) for r in report["results"]}


def test_finetuning_beats_chance_on_one_process(pretrained, tmp_path, splits):
    data = _write(str(tmp_path / "data"), "jsonl", splits)
    out = run_distributed(_finetune_worker, 1, (pretrained, data, str(tmp_path / "ft"),
                                                dict(max_steps=200, eval_interval=100, save_interval=0), 3e-3, {}))[0]
    scores = _scores(out["report"])
    assert set(scores) == {(s, k) for s in ("valid", "test") for k in (1, 2)}
    assert min(acc for acc, _ in scores.values()) > 0.7, scores  # chance: 0.5 (60 texts per split)
    written = json.loads((tmp_path / "ft" / "finetune_eval.json").read_text())
    assert written["labels"] == ["neg", "pos"] and len(written["results"]) == 4
    k1 = next(r for r in written["results"] if r["eval_k"] == 1)
    assert 0.5 < k1["flops_vs_largest_k"] < 1


def test_resume_is_exact(pretrained, tmp_path, splits):
    data = _write(str(tmp_path / "data"), "jsonl", splits)
    kw = dict(max_steps=6, eval_interval=0, save_interval=3)
    straight = run_distributed(_finetune_worker, 2, (pretrained, data, str(tmp_path / "a"), kw, 3e-3, {}))[0]
    first = run_distributed(_finetune_worker, 2, (pretrained, data, str(tmp_path / "b"), {**kw, "stop_after": 3},
                                                  3e-3, {}))[0]
    rest = run_distributed(_finetune_worker, 2, (pretrained, data, str(tmp_path / "b"), {**kw, "resume": True},
                                                 3e-3, {}))[0]
    assert first["step"] == 3 and rest["step"] == 6
    assert first["losses"] + rest["losses"] == pytest.approx(straight["losses"], abs=1e-6)
    for key, (acc, loss) in _scores(straight["report"]).items():
        assert _scores(rest["report"])[key] == pytest.approx((acc, loss), abs=1e-6)
    # A classifier is neither a language model to evaluate nor a checkpoint to fine-tune again.
    from s2moe_ds.checkpoint import load_model
    from s2moe_ds.train.finetune import pretrained_meta
    with pytest.raises(ConfigError, match="fine-tuned classifier"):
        load_model(str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="fine-tuned classifier"):
        pretrained_meta(str(tmp_path / "a"))


def test_checkpoint_of_two_processes_finetunes_on_one_and_on_two(pretrained, tmp_path, splits):
    """The same pretrained model arrives on either layout: with a learning rate too small to move
    it, the evaluations agree (and evaluation does not depend on the process count)."""
    data = _write(str(tmp_path / "data"), "jsonl", splits)
    kw = dict(max_steps=2, eval_interval=0, save_interval=0)
    one = run_distributed(_finetune_worker, 1, (pretrained, data, str(tmp_path / "one"), kw, 1e-12, {}))[0]
    two = run_distributed(_finetune_worker, 2, (pretrained, data, str(tmp_path / "two"), kw, 1e-12, {}))[0]
    s1, s2 = _scores(one["report"]), _scores(two["report"])
    assert set(s1) == set(s2)
    for key in s1:
        assert s1[key] == pytest.approx(s2[key], abs=1e-5), key


def test_flags_and_checkpoints_are_checked_before_compute(pretrained, tmp_path, splits, capsys):
    from launch.finetune import main
    data = _write(str(tmp_path / "data"), "jsonl", splits)
    base = ["--deepspeed_config", "ds_configs/finetune.json", "--path", data, "--out-dir", str(tmp_path / "x")]
    cases = [
        (["--pretrained", str(tmp_path / "nowhere")], "finetune.pretrained"),
        (["--pretrained", pretrained, "--set", "block=moe"], "--set block"),
        (["--pretrained", pretrained, "--set", "uncertainty_coef=-1"], "uncertainty_coef"),
        (["--pretrained", pretrained, "--set", "capacity=2"], "unknown field 'capacity'"),
        (["--pretrained", pretrained, "--pooling", "max"], "finetune.pooling"),
        (["--pretrained", pretrained, "--eval-k", "0"], "finetune.eval_k"),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2, extra
        assert expected in capsys.readouterr().err, extra


def _short_rows(n, seed):
    """Texts of 2 to about 25 characters: shorter than the model's 32 positions, so each batch's
    longest text, and with it the padding, differs from rank to rank."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER[:5]) for _ in range(rng.randint(0, 3))] + [rng.choice(POSITIVE if y else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    return rows


def _layout_worker(rank, world_size, pretrained, data, out_dir, ep_size):
    from s2moe_ds.train.finetune import FinetuneConfig, finetune, finetune_experiment
    cfg = FinetuneConfig(pretrained=pretrained, data=ClassificationDataConfig(path=data), eval_k=(1,))
    experiment = finetune_experiment(cfg, {"ep_size": ep_size},
                                     {"out_dir": out_dir, "max_steps": 2, "warmup_steps": 1, "eval_interval": 0,
                                      "save_interval": 0})
    return finetune(cfg, experiment, _ds_config())["losses"]


def test_texts_of_different_lengths_train_with_expert_parallelism(pretrained, tmp_path):
    """Each rank padded its micro-batch to its own longest text: with ep_size 2 the ranks' token
    counts, and so the expert all-to-all's sizes, differed and gloo aborted at step 1. Padded to
    the step's longest text over all ranks, they train, with the losses of ep_size 1."""
    from s2moe_ds.data import load_tokenizer
    from s2moe_ds.train.finetune import pretrained_meta
    data = _write(str(tmp_path / "data"), "jsonl", {"train": _short_rows(200, 4), "valid": _short_rows(16, 5)})
    # The premise: at step 1 the two ranks' longest texts differ (micro batch 8, seed 1234).
    tokenizer = load_tokenizer(os.path.join(pretrained_meta(pretrained)["step_dir"], "tokenizer.json"))
    train = load_classification(ClassificationDataConfig(path=data), tokenizer, 32).splits["train"]
    longest = [train.longest(ExampleBatchSampler(len(train), 8, r, 2, seed=1234).next_indices()) for r in range(2)]
    assert longest[0] != longest[1] and max(longest) < 32, longest
    ep2 = run_distributed(_layout_worker, 2, (pretrained, data, str(tmp_path / "ep2"), 2))
    ep1 = run_distributed(_layout_worker, 2, (pretrained, data, str(tmp_path / "ep1"), 1))
    for rank in range(2):
        assert len(ep2[rank]) == 2 and ep2[rank] == pytest.approx(ep1[rank], abs=1e-5), (ep2[rank], ep1[rank])


def _counting_worker(rank, world_size, pretrained, data, out_dir):
    from s2moe_ds.train.finetune import FinetuneConfig, finetune, finetune_experiment
    from ..distributed.test_host_syncs import HostSyncCounter, plain_steps
    cfg = FinetuneConfig(pretrained=pretrained, data=ClassificationDataConfig(path=data), eval_k=(1,))
    experiment = finetune_experiment(cfg, {"ep_size": world_size},
                                     {"out_dir": out_dir, "max_steps": 4, "warmup_steps": 1, "eval_interval": 0,
                                      "save_interval": 0, "log_interval": 10**6})
    with HostSyncCounter() as counter:
        final = finetune(cfg, experiment, {**_ds_config(), "train_micro_batch_size_per_gpu": 4,
                                           "gradient_accumulation_steps": 2}, hooks=[counter])
    return {"steps": plain_steps(counter.counts, 4), "losses": final["losses"]}


def test_one_read_and_one_collective_per_finetuning_step(pretrained, tmp_path):
    """Texts of different lengths, 2 accumulation steps on 2 processes: every rank knows the
    micro-batch's longest text without a collective (was 9 reads and 5 collectives a step)."""
    data = _write(str(tmp_path / "data"), "jsonl", {"train": _short_rows(200, 4), "valid": _short_rows(16, 5)})
    for r in run_distributed(_counting_worker, 2, (pretrained, data, str(tmp_path / "ft"))):
        assert sorted(r["steps"]) == [1, 2, 3] and len(r["losses"]) == 4
        for step, c in r["steps"].items():
            assert c.get("reads", 0) <= 1 and c.get("collectives", 0) <= 1, (step, c)

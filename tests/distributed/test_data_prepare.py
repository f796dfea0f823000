"""Which ranks fill the token cache (issue 26 item 1), on 2 gloo ranks of one host: a --cache-dir
both ranks see is filled by global rank 0 alone; a folder only one rank sees (node-local, here a
folder per rank) is filled by each rank that does not see rank 0's marker; a failure on the
preparing rank ends both with its message; ranks that wait past data.prepare_timeout_s give up
naming the COMPLETE file they wait for."""

import multiprocessing
import os

from ..harness import run_distributed

TEXT = "".join(f"line {i}: the cat sat on the mat.\n" for i in range(300))


def _prepare(rank, world, corpus, cache_dir, per_rank, extra):
    from s2moe_ds.config import ConfigError
    from s2moe_ds.data import DataConfig
    from s2moe_ds.data import cache as cache_mod
    built = []
    original = cache_mod._build_tokenizer

    def counting(*a, **kw):
        built.append(rank)
        if extra.get("fail"):
            raise ConfigError("data.path: injected failure on the preparing rank")
        if extra.get("slow"):
            import time
            time.sleep(extra["slow"])
        return original(*a, **kw)
    cache_mod._build_tokenizer = counting
    folder = os.path.join(cache_dir, f"rank{rank}") if per_rank else cache_dir
    # "workers": a subword cache applied by 2 processes forked from rank 0's preparing thread
    # while its main thread waits in a gloo collective.
    cache_mod._SMALL_SPLIT = 0 if extra.get("workers") else 8 * cache_mod.ENCODE_CHUNK_CHARS
    multiprocessing.current_process().daemon = False  # the harness's ranks are daemons; a launcher's are not
    cfg = DataConfig(dataset="path", path=corpus, cache_dir=folder, tokenizer=extra.get("tokenizer", "auto"),
                     subword_vocab_size=300, tokenize_workers=extra.get("workers", 0),
                     prepare_timeout_s=extra.get("timeout", 86400.0))
    try:
        prepared = cache_mod.prepare_on_ranks(cfg, poll_s=0.5)
    except ConfigError as e:
        return {"error": str(e), "built": built}
    finally:
        cache_mod._build_tokenizer = original
    leftovers = [n for n in os.listdir(cache_dir) if n.startswith(cache_mod.PROBE_PREFIX)]
    return {"built": built, "tokens": len(prepared.splits["train"]), "folder": prepared.cache_path,
            "probes_left": leftovers}


def _scenarios(rank, world, corpus, root):
    """Every case in one pair of processes (starting them is most of the time)."""
    return {name: _prepare(rank, world, corpus, os.path.join(root, name), per_rank, extra)
            for name, per_rank, extra in (("shared", False, {}), ("local", True, {}),
                                          ("fail", False, {"fail": True}),
                                          ("workers", False, {"tokenizer": "subword", "workers": 2}),
                                          ("slow", False, {"slow": 6, "timeout": 1.0}))}


def test_which_ranks_fill_the_cache(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = run_distributed(_scenarios, 2, args=(str(corpus), str(tmp_path)), timeout=180)
    shared = [o["shared"] for o in out]
    assert [o["built"] for o in shared] == [[0], []]  # shared: global rank 0 alone
    assert shared[0]["folder"] == shared[1]["folder"] and shared[0]["tokens"] == shared[1]["tokens"] > 0
    assert shared[0]["probes_left"] == [] and shared[1]["probes_left"] == []  # the marker is removed
    local = [o["local"] for o in out]
    assert [o["built"] for o in local] == [[0], [1]]  # node-local: each folder filled once
    assert local[0]["folder"] != local[1]["folder"] and local[0]["tokens"] == local[1]["tokens"]
    workers = [o["workers"] for o in out]
    assert [o["built"] for o in workers] == [[0], []] and workers[0]["tokens"] == workers[1]["tokens"] > 0
    assert [o["fail"]["error"] for o in out] == ["data.path: injected failure on the preparing rank"] * 2
    for o in out:
        error = o["slow"]["error"]
        assert "data.prepare_timeout_s: rank 0 has not finished preparing the corpus after 1 s" in error
        assert str(tmp_path / "slow") in error and "COMPLETE not written yet" in error

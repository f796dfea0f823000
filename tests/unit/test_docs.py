"""The docs hold against the code: tables of config fields and of the DeepSpeed configs are the ones
s2moe_ds.doctables writes from the dataclasses and ds_configs/*.json, every field of a router, block
kind or backbone is in a table, and every file or s2moe_ds name the docs mention exists."""

import dataclasses
import importlib
import pathlib
import re

import pytest

from s2moe_ds import doctables
from s2moe_ds.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md"))
REGENERATE = "python -m s2moe_ds.doctables docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_generated_tables_match_the_code(page):
    text = page.read_text()
    assert doctables.render(text) == text, f"docs/{page.name} has a stale table: {REGENERATE}"


def test_every_router_block_and_backbone_field_is_in_a_table():
    shown = {pair for page in PAGES for pair in doctables.documented_fields(page.read_text())}
    promised = [name for name in doctables.configs() if name.split(".")[0] in ("router", "block", "backbone")]
    assert promised, "the registries gave no router, block or backbone settings"
    missing = [f"{name}.{f.name}" for name in promised for f in dataclasses.fields(doctables.configs()[name])
               if (name, f.name) not in shown]
    assert not missing, (f"fields in no docs table: {missing}; add them to a <!-- fields: ... --> marker "
                         f"(docs/routers.md, method.md, backbones.md), then {REGENERATE}")


def test_layer_md_lists_every_s2moe_field():
    text = (ROOT / "docs" / "layer.md").read_text()
    shown = {f for name, f in doctables.documented_fields(text) if name == "block.s2moe"}
    assert shown == {f.name for f in dataclasses.fields(doctables.configs()["block.s2moe"])}


def test_training_md_lists_every_deepspeed_config_and_preset():
    from s2moe_ds.train import PRESETS
    text = doctables.render((ROOT / "docs" / "training.md").read_text())
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        assert f"| `ds_configs/{path.name}` |" in text, path.name
    for name in PRESETS:
        assert f"| `{name}` |" in text, name


def test_the_ds_configs_table_says_what_each_file_trains_with(tmp_path):
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "a.json").write_text(
        '{"train_batch_size": 44, "gradient_clipping": 0.25, "zero_optimization": {"stage": 2},'
        ' "optimizer": {"type": "Adam", "params": {"lr": 3.5e-4, "betas": [0.9, 0.999], "weight_decay": 0.0}},'
        ' "scheduler": {"type": "WarmupLR"}}')
    row = doctables.ds_configs_table(str(tmp_path)).splitlines()[-1]
    assert row.startswith("| `ds_configs/a.json` | Adam (DeepSpeed's) | 0.00035 | 0.9/0.999 | 0.0 | global 44")
    assert "| 0.25 | 2 |" in row and "WarmupLR" in row


def test_a_marker_naming_an_unknown_config_or_field_is_refused():
    with pytest.raises(ConfigError, match="no config named 'router.nope'"):
        doctables.fields_table("router.nope")
    with pytest.raises(ConfigError, match="S2MoEConfig has no field noise_sclae"):
        doctables.fields_table("block.s2moe noise_sclae")


def test_a_field_table_shows_name_flag_type_default_and_docstring():
    table = doctables.fields_table("block.s2moe noise_scale; moe k")
    rows = table.splitlines()
    assert rows[0] == "| field | flag | type | default | meaning |"
    assert rows[2].startswith("| `s2moe.noise_scale` | `--s2moe.noise-scale` | float | `1.0` | s in N1 = 1 + s\\*sigma")
    assert rows[3].startswith("| `moe.k` | `--moe.k` | int | `2` | Experts per token")
    assert "| `--s2moe.[no-]fused` |" in doctables.fields_table("block.s2moe fused")


# A path the docs name: under a top-level folder of the repository, or under s2moe_ds/ (or its moe/)
# written without the package, ending in a file name with an extension or in a '/'.
TOP = ("s2moe_ds", "launch", "ds_configs", "tests", "bench", "tokenizers", ".ci", "docs", "checkpoint", "config",
       "data", "eval", "experiments", "hf", "models", "moe", "parallel", "train", "routers", "blocks", "method", "fused")
PATH = re.compile(r"(?<![\w./:<-])((?:%s)/(?:[\w.-]+/)*(?:[\w-]+\.(?:py|json|md|sh|png|txt|toml|cfg)\b|(?=[`\s)])))"
                  % "|".join(re.escape(t) for t in TOP))


def _named_paths(text: str):
    for m in PATH.finditer(text):
        yield m.group(1)


def _exists(path: str) -> bool:
    return any((base / path).exists() for base in (ROOT, ROOT / "s2moe_ds", ROOT / "s2moe_ds" / "moe"))


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_file_the_docs_name_exists(page):
    text = page.read_text()
    missing = sorted({p for p in _named_paths(text) if not _exists(p)})
    missing += sorted(f"{path}::{name}" for path, name in set(re.findall(r"(tests/\w+\.py)::(\w+)", text))
                      if not (ROOT / path).exists() or f"def {name}(" not in (ROOT / path).read_text())
    assert not missing, f"{page.name} names files (or tests) that do not exist: {missing}"


def test_the_path_check_finds_paths():
    found = list(_named_paths("see `s2moe_ds/moe/blocks/s2moe.py`, launch/nope.py, `moe/fused/`; "
                              "train/loss is a tag, https://x.org/launch/a.py a link"))
    assert found == ["s2moe_ds/moe/blocks/s2moe.py", "launch/nope.py", "moe/fused/"]
    assert _exists(found[0]) and not _exists(found[1]) and _exists(found[2])


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("s2moe_ds"):
                return True  # an optional extra (s2moe_ds.hf needs transformers) this venv lacks
            continue
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_s2moe_ds_name_the_docs_use_exists(page):
    names = set(re.findall(r"\bs2moe_ds(?:\.\w+)+", page.read_text()))
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{page.name} names what s2moe_ds does not have: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES, *sorted((ROOT / "docs" / "history").glob("*.md"))],
                         ids=lambda p: p.name)
def test_links_and_their_anchors_resolve(page):
    for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text()):
        linked = (page.parent / target) if target else page
        assert linked.exists(), f"{page.name} links {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name} links {target}#{anchor}: no such heading"


# Names the docs quote that belong to other programs (DeepSpeed, SLURM, NCCL, the shell), or are
# examples of a value; every other quoted name must occur somewhere in the project's files.
FOREIGN_NAMES = {"adam_w_mode", "CUDA_VISIBLE_DEVICES", "GraceTime", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "eth0", "ib0"}
FOREIGN_FLAGS = {"--gpus-per-task", "--gres", "--hostfile", "--num_nodes"}


def _project_text() -> str:
    text = []
    for pattern in ("s2moe_ds/**/*.py", "launch/*", "bench/*", "tests/**/*.py", "ds_configs/*.json", "slurm/*",
                    "tokenizers/**/*", ".ci/*", "Makefile", "setup.py", "docs/cli.md"):
        for path in ROOT.glob(pattern):
            if path.is_file():
                text.append(path.read_text(errors="replace"))
    return "\n".join(text)


@pytest.fixture(scope="module")
def project_words():
    text = _project_text()
    return text, set(re.findall(r"\w+", text))


@pytest.mark.parametrize("page", [ROOT / "README.md", *[p for p in PAGES if p.name != "cli.md"]], ids=lambda p: p.name)
def test_every_name_and_flag_the_docs_quote_exists(page, project_words):
    text, words = project_words
    quoted = re.findall(r"`([^`\n]+)`", page.read_text())
    names = {c.strip() for c in quoted if re.fullmatch(r"[A-Za-z_][\w.]*", c.strip())}
    missing = sorted(n for n in names if n.rstrip(".").split(".")[-1] not in words and n not in FOREIGN_NAMES
                     and not re.fullmatch(r"step\d{8}", n))
    flags = {f.replace("[no-]", "") for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*(?:\.[\w\[\]-]*\w)?)", page.read_text())}
    # A flag is quoted as written somewhere (a script, cli.md) or is a field's plain name (--xmoe-dim,
    # --no-fused), which the parser accepts as well.
    missing += sorted(f for f in flags if f not in text and f not in FOREIGN_FLAGS
                      and re.sub(r"^no_", "", f[2:].replace("-", "_")) not in words)
    assert not missing, f"{page.name} quotes names or flags that no file of the project has: {missing}"


def test_architecture_md_names_every_package_and_module():
    layout = re.search(r"```\nlaunch/.*?```", (ROOT / "docs" / "architecture.md").read_text(), re.S).group(0)
    parts = [p.name for p in (ROOT / "s2moe_ds").iterdir() if p.name != "__init__.py"
             and (p.suffix == ".py" or (p / "__init__.py").exists())]
    missing = sorted(p for p in parts if not re.search(rf"(?<![\w/]){re.escape(p.removesuffix('.py'))}(/|\.py)", layout))
    assert not missing, f"docs/architecture.md's layout leaves out s2moe_ds/{missing}; add a line for each"


def test_routers_md_lists_every_comparison_variant():
    from s2moe_ds.experiments.compare import BUILTIN_VARIANTS
    text = doctables.render((ROOT / "docs" / "routers.md").read_text())
    assert [name for name in BUILTIN_VARIANTS if f"| `{name}` |" not in text] == []


def test_readme_links_every_page_of_docs():
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", (ROOT / "README.md").read_text()))
    assert sorted(p.name for p in PAGES if p.name not in linked) == [], "add the page to README's table of docs"


def test_the_inference_flops_ratios_the_docs_quote():
    import dataclasses
    from s2moe_ds.eval.flops import inference_cost_ratio
    from s2moe_ds.train import PRESETS
    paper_small = PRESETS["paper-small"]().model
    tiny_on_shakespeare = dataclasses.replace(PRESETS["tiny"]().model, vocab_size=66)
    assert round(inference_cost_ratio(paper_small, 512, 1, 2), 2) == 0.72
    assert round(inference_cost_ratio(tiny_on_shakespeare, 64, 1, 2), 2) == 0.71
    for page in ("method.md", "evaluation.md", "performance.md", "results.md"):
        assert "0.72x" in (ROOT / "docs" / page).read_text(), page


def test_the_parameter_counts_results_md_quotes():
    from s2moe_ds.models import ModelConfig, build_model
    from s2moe_ds.train import PRESETS
    text = (ROOT / "docs" / "results.md").read_text()
    for preset, counts in (("txl-tiny", ("179,010", "179,140")), ("tiny", ("175,360", "175,490"))):
        for block, quoted in zip(("moe", "s2moe"), counts):
            # tinyshakespeare's training split has 65 characters; the tokenizer adds the unknown symbol.
            cfg = PRESETS[preset]().model.to_dict()
            cfg.update(vocab_size=66, moe={**cfg["moe"], "block": block, "block_config": None})
            assert f"{sum(p.numel() for p in build_model(ModelConfig(**cfg)).parameters()):,}" == quoted
            assert quoted in text, quoted

"""The README opens with its two commands, the layer's usage example (docs/layer.md) runs as written,
and every command line of README.md and docs/ that runs launch/*.py still parses."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_layer_usage_example_runs():
    text = (ROOT / "docs" / "layer.md").read_text()
    usage = text[text.index("### Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/layer.md:Usage", "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape


def test_readme_opens_with_the_test_command():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "make test" in first_block and "make train" in first_block


def test_docs_links_resolve():
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", md.read_text()):
            assert (md.parent / target).exists(), f"{md.name} links {target}, which does not exist"


SCRIPT = re.compile(r"^(?:.*/)?launch/(\w+)\.py$")
LAUNCHERS = ("python", "deepspeed", "torchrun", "mpirun", "srun", "OMP_NUM_THREADS")
SHELL_STOPS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


def _command_lines(text):
    """Lines of fenced code (continuations joined) and inline code spans that start a command."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose) if s.lstrip().startswith(LAUNCHERS)]


def _arguments(tokens):
    """A documented command's arguments, placeholders made concrete: $VAR and a capital-letter name
    (--seed S) are 1, [optional] parts are given, and a `...` that stands for more flags is dropped
    (after a flag it is that flag's value)."""
    out = []
    for token in tokens:
        if token in SHELL_STOPS:
            break
        if token == "..." and not (out and out[-1].startswith("-")):
            continue
        out.append(re.sub(r"\$\{?\w+\}?|^[A-Z][A-Z_]*$", "1", token).strip("[]"))
    return out


def documented_commands():
    """(file, script, arguments) of every command in README.md and docs/ that runs launch/*.py."""
    import shlex
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if md.name == "cli.md":  # generated from --help: its usage lines are not commands
            continue
        for line in _command_lines(md.read_text()):
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, token in enumerate(tokens):
                if SCRIPT.match(token):
                    yield str(md.relative_to(ROOT)), SCRIPT.match(token).group(1), _arguments(tokens[i + 1:])
                    break


def test_every_documented_command_still_parses():
    """The command lines of README.md and docs/ (written before sectioned flags, in plain names) parse
    with today's scripts; launch/pretrain.py's, compare's pass-through flags included, also build
    their ExperimentConfig (unless a file only the writer's machine has is missing), except in the
    dated notes of docs/history/, whose commands ran on the code of their day."""
    from s2moe_ds import cli
    from s2moe_ds.config import ConfigError
    parsers = {"pretrain": cli.pretrain_parser(), "finetune": cli.finetune_parser(), "evaluate": cli.evaluate_parser(),
               "generate": cli.generate_parser(), "consolidate": cli.consolidate_parser()}
    seen = []
    for where, script, args in documented_commands():
        if "--help" in args:
            continue
        if script in ("compare", "study"):  # their unknown flags pass through to launch/pretrain.py
            _, args = (cli.compare_parser() if script == "compare" else cli.study_parser()).parse_known_args(args)
            script = "pretrain"
        try:
            ns = parsers[script].parse_args(args)
        except SystemExit:
            raise AssertionError(f"{where}: launch/{script}.py {' '.join(args)} no longer parses")
        if script == "pretrain" and not where.startswith("docs/history/"):  # history: the code of its day
            try:
                cli.experiment_from_args(ns)
            except ConfigError as e:
                assert str(e).startswith("data.path: "), f"{where}: launch/pretrain.py {' '.join(args)}: {e}"
        seen.append(script)
    assert len(seen) >= 20 and set(seen) == set(parsers), seen

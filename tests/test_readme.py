"""The README opens with its two commands, and the layer's usage example (docs/layer.md) runs as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


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

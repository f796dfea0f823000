"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    usage = text[text.index("### Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md:Usage", "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape


def test_readme_opens_with_the_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert "make test" in first_block and "make train" in first_block

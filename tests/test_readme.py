"""The README's Python quickstart runs as written."""

import os
import re


def test_quickstart_runs(capsys):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf8").read()
    code = re.search(r"## Quickstart \(Python\)\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "What is a KV cache?" in out and len(out.split("assistant", 1)[-1].strip()) > 20

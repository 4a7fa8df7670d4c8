"""The README tells the truth: its Python tour runs and its two commands match CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_has_exactly_two_commands_and_ci_runs_them() -> None:
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert [c.strip() for c in commands] == [
        'pip install -c constraints.txt -e ".[bench]" && python -m kfac compare --optimizers '
        "adam muon bkfac --quadratic-step --adaptive-damping --inverse-options "
        """'{"rank": 64, "identity_clock": "batches"}' --target-loss 0.01 --plot compare.png""",
        'pip install -c constraints.txt -e ".[test]" && python -m pytest',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[test]"' in ci
    assert "python -m pytest" in ci
    assert (ROOT / "constraints.txt").read_text().strip() == "torch==2.13.0"

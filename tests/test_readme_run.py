"""The README's newcomer run (.ci/readme_run.py, a CI step of its own, which installs
from PyPI): here only what needs no network, so that a README edit that loses a
mark, or a set-up line the run cannot guard, fails `python -m pytest` too."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parent.parent


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_run = load("readme_run")


def test_the_readme_marks_every_block_the_run_needs() -> None:
    found = readme_run.blocks(ROOT / "README.md")
    assert "git clone " in found["setup"]
    assert "python3 -m venv" in found["setup"]
    assert "pip install ." in found["run"]
    for name in ("setup", "run"):
        readme_run.guarded(found[name], name == "run")
    for name in ("subscribe", "publish"):
        assert readme_run.README_ADDRESS in found[name]


def test_a_mark_without_its_block_is_one_line(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- ci: setup -->\nSome words, no fence.\n")
    with pytest.raises(readme_run.Failure, match=r"^README.md:1: .* not followed by a fenced"):
        readme_run.blocks(readme)


def test_a_failing_setup_line_stops_the_shell_with_its_words(tmp_path: Path) -> None:
    script = readme_run.guarded("false && echo never\necho after\nexit 7\n", True)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "readme_run: this README line failed: false && echo never\n"


def test_curl_replies_without_newlines_are_separate_values() -> None:
    text = '{"channel":"news","id":"1-0"}{"channel":"news","id":"2-0"}\n'
    assert [value["id"] for value in readme_run.json_values(text)] == ["1-0", "2-0"]
    with pytest.raises(readme_run.Failure, match="not JSON"):
        readme_run.json_values('{"a":1} <html>')

"""The repository's promises to its users: two commands, pinned versions, CI runs the tests."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    ci = re.search(r"^TEST_COMMAND='(.+)'$", (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    assert f"\n{ci}\n" in (ROOT / "README.md").read_text()


def test_requirements_are_exact_pins():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert "torch==2.13.0" in lines
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+]*", line) for line in lines), lines


def test_every_equation_the_core_cites_is_labelled_in_the_methods():
    cited = set(re.findall(r"Eq\. \(([^)]+)\)", (ROOT / "minflow.py").read_text())) - {"name"}
    displays = [line.rstrip() for line in (ROOT / "docs" / "methods.md").read_text().splitlines()
                if line.startswith("    ")]
    labelled = {label for label in cited if any(line.endswith(f"({label})") for line in displays)}
    assert len(cited) >= 14 and cited == labelled, cited - labelled

"""Every tutorial in docs/tutorials runs in the suite, and its key numbers are the ones its page shows.

A tutorial prints `RESULT name=value [tolerance=t]` lines; its page includes the output that
`make tutorials` recorded (docs/tutorials/output/NAME.txt). This test runs the script again on the
shipped data and compares the RESULT lines: equal within the tolerance the script declares (none
means exactly equal as printed). Timings are printed as `TIME` lines and never compared.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, env_with_repo

TUTORIALS = sorted(p.stem for p in (REPO / "docs" / "tutorials").glob("*.py") if p.stem != "machine")
RESULT = re.compile(r"^RESULT (\w+)=(\S+)(?: tolerance=(\S+))?$", re.MULTILINE)


def results(text: str) -> dict[str, tuple[str, float]]:
    return {name: (value, float(tol or 0)) for name, value, tol in RESULT.findall(text)}


def test_every_tutorial_has_a_page_and_recorded_output():
    pages = {p.stem for p in (REPO / "docs" / "tutorials").glob("*.md")}
    assert TUTORIALS and {t.replace("_", "-") for t in TUTORIALS} == pages
    for name in TUTORIALS:
        assert results((REPO / "docs" / "tutorials" / "output" / f"{name}.txt").read_text()), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("tutorial-data")


@pytest.mark.slow
@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs_and_prints_what_its_page_shows(name, data):
    proc = subprocess.run([sys.executable, str(REPO / "docs" / "tutorials" / f"{name}.py"), str(data)],
                          env=env_with_repo(), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = results(proc.stdout)
    shown = results((REPO / "docs" / "tutorials" / "output" / f"{name}.txt").read_text())
    assert set(got) == set(shown)
    for key, (value, tolerance) in shown.items():
        try:
            assert abs(float(got[key][0]) - float(value)) <= tolerance, (key, got[key][0], value)
        except ValueError:
            assert got[key][0] == value, key

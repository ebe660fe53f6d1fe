"""dev.py, the two README commands: what each one installs and runs.

dev.py runs in a scratch copy of the project whose .venv holds stand-ins for python,
ruff, mypy and wsproxy (and whose .ci/chart-checks.sh and .ci/install-rabbitmq.sh are
ones too): each records the command it was given, so a test sees every step in order
without installing anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$DEV_TEST_LOG"
case " $DEV_TEST_FAIL " in *" $(basename "$0") "*) exit 3;; esac
exit 0
"""


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "commands.log"
        self.stamp = root / ".venv" / ".dev-install-stamp"

    def digest(self) -> str:
        return hashlib.sha256((self.root / "pyproject.toml").read_bytes()).hexdigest()

    def stamp_with(self, extras: str) -> None:
        self.stamp.write_text(f"{self.digest()} {extras}\n")

    def dev(self, *args: str, fail: str = "") -> tuple[int, list[str]]:
        """Run ``python3 dev.py ARGS``; its exit code and the commands it ran."""
        self.log.write_text("")
        env = {**os.environ, "DEV_TEST_LOG": str(self.log), "DEV_TEST_FAIL": fail}
        done = subprocess.run(
            [sys.executable, str(self.root / "dev.py"), *args],
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        return done.returncode, self.log.read_text().splitlines()


@pytest.fixture
def project(tmp_path: Path) -> Project:
    shutil.copy(ROOT / "dev.py", tmp_path / "dev.py")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".ci").mkdir()
    for script in ("chart-checks.sh", "install-rabbitmq.sh"):
        (tmp_path / ".ci" / script).write_text(
            f'echo "{script} $*" >> "$DEV_TEST_LOG"\n'
            f'case " $DEV_TEST_FAIL " in *" {script} "*) exit 3;; esac\n'
        )
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "ruff", "mypy", "wsproxy"):
        exe = bin_dir / name
        exe.write_text(RECORDER)
        exe.chmod(0o755)
    p = Project(tmp_path)
    p.stamp_with("test")
    return p


def test_test_with_pytest_arguments_runs_only_pytest_with_them(project: Project) -> None:
    code, ran = project.dev("test", "-k", "keepalive", "-x")
    assert code == 0
    assert ran == ["python -m pytest -k keepalive -x"]


def test_test_exit_code_is_pytests(project: Project) -> None:
    code, ran = project.dev("test", "-k", "keepalive", fail="python")
    assert code == 3 and ran == ["python -m pytest -k keepalive"]


def test_full_gate_installs_rabbitmq_runs_chart_checks_lints_and_every_test_once(
    project: Project,
) -> None:
    code, ran = project.dev("test")
    assert code == 0
    # The broker is installed first, so the AMQP tests below run (or skip with why).
    assert ran[:5] == [
        "install-rabbitmq.sh ",
        "chart-checks.sh ",
        "ruff check .",
        "ruff format --check .",
        "mypy --strict wsproxy",
    ]
    pytests = [line.split()[3:] for line in ran[5:]]
    assert [line.split()[:3] for line in ran[5:]] == [["python", "-m", "pytest"]] * 2
    unit, rest = pytests
    # tests/unit alone, under coverage of the pure modules at 100% of branches ...
    assert unit[0] == "tests/unit"
    assert "--cov-branch" in unit and "--cov-fail-under=100" in unit
    assert {a for a in unit if a.startswith("--cov=")} == {
        "--cov=wsproxy.frames",
        "--cov=wsproxy.keepalive",
        "--cov=wsproxy.http",
        "--cov=wsproxy.config",
        "--cov=wsproxy.exchange",
        "--cov=wsproxy.connection",
        "--cov=wsproxy.events.contract",
    }
    # ... then the whole suite (pytest's testpaths) except tests/unit: each test once.
    assert rest == ["--ignore=tests/unit"]


@pytest.mark.parametrize(
    ("failing", "last"),
    [("install-rabbitmq.sh", 0), ("chart-checks.sh", 1), ("ruff", 2), ("mypy", 4), ("python", 5)],
)
def test_full_gate_stops_at_the_first_failing_step(
    project: Project, failing: str, last: int
) -> None:
    code, ran = project.dev("test", fail=failing)
    assert code == 3
    assert len(ran) == last + 1 and ran[-1].startswith(failing)


def test_bench_installs_rabbitmq_first_and_runs_even_when_that_fails(project: Project) -> None:
    project.stamp_with("bench,test")
    assert project.dev("bench", "--quick") == (
        0,
        ["install-rabbitmq.sh ", "python -m bench --quick"],
    )
    code, ran = project.dev("bench", "--quick", fail="install-rabbitmq.sh")
    assert code == 0
    assert ran == ["install-rabbitmq.sh ", "python -m bench --quick"]


def test_demo_installs_no_extra_on_a_fresh_venv(project: Project) -> None:
    project.stamp.unlink()
    code, ran = project.dev("demo", "--port", "0")
    assert code == 0
    assert ran == [
        "python -m pip install --quiet --progress-bar off -e .",
        "wsproxy demo --port 0",
    ]
    # The next demo starts at once; `test` then adds its extra, keeping what is there.
    assert project.dev("demo")[1] == ["wsproxy demo"]
    _, ran = project.dev("test", "-k", "x")
    assert ran[0] == "python -m pip install --quiet --progress-bar off -e .[test]"
    assert project.dev("demo")[1] == ["wsproxy demo"]


def test_demo_after_test_installs_nothing(project: Project) -> None:
    assert project.dev("demo")[1] == ["wsproxy demo"]


def test_changed_pyproject_reinstalls_with_every_extra_installed_before(
    project: Project,
) -> None:
    project.stamp_with("bench,test")
    with (project.root / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    _, ran = project.dev("demo")
    assert ran == [
        "python -m pip install --quiet --progress-bar off -e .[bench,test]",
        "wsproxy demo",
    ]
    assert project.stamp.read_text().split() == [project.digest(), "bench,test"]

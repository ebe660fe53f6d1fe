"""Set-up commands for a fresh machine that has only Python 3.11 (standard library only).

    python3 dev.py demo [ARGS...]    wsproxy demo: an echo upstream with wsproxy in front of it
    python3 dev.py test [PYTEST...]  ruff check, ruff format --check, mypy --strict, pytest
    python3 dev.py bench [ARGS...]   python -m bench (see bench/__main__.py)

Each creates .venv in the project root when missing and installs the project into it
(editable, with the extras it needs); the install is redone only when pyproject.toml
changed since the last one (a stamp file in .venv holds its hash).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".dev-install-stamp"
PURE_MODULES = ("frames", "keepalive", "http", "config", "exchange")


def fail(message: str, code: int = 1) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(cmd: list[str], *, shown: str | None = None) -> int:
    print(f"==> {shown or ' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL).returncode


def step(cmd: list[str], shown: str) -> None:
    """Run one step; on failure stop here with its exit code."""
    code = run(cmd, shown=shown)
    if code != 0:
        fail(f"'{shown}' failed (exit code {code})", code)


def ensure_venv(extras: set[str]) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by any python3
        fail(f"Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        python = Path(sys.executable).name
        step([sys.executable, "-m", "venv", str(VENV)], f"{python} -m venv .venv")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = STAMP.read_text().strip() if STAMP.exists() else ""
    stamped_digest, _, stamped = stamp.partition(" ")
    have = set(filter(None, stamped.split(","))) if stamped_digest == digest else set()
    if stamped_digest == digest and extras <= have:
        return
    want = ",".join(sorted(extras | have))
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--progress-bar", "off"]
    step([*pip, "-e", f".[{want}]"], f"pip install -e '.[{want}]'")
    STAMP.write_text(f"{digest} {want}\n")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    command, args = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "demo":
        ensure_venv({"test"})
        print(f"==> wsproxy demo {' '.join(args)}".rstrip(), flush=True)
        os.execv(BIN / "wsproxy", ["wsproxy", "demo", *args])
    elif command == "bench":
        ensure_venv({"test", "bench"})
        shown = " ".join(["python -m bench", *args])
        sys.exit(run([str(BIN / "python"), "-m", "bench", *args], shown=shown))
    else:
        ensure_venv({"test"})
        step([str(BIN / "ruff"), "check", "."], "ruff check .")
        step([str(BIN / "ruff"), "format", "--check", "."], "ruff format --check .")
        step([str(BIN / "mypy"), "--strict", "wsproxy"], "mypy --strict wsproxy")
        # The pure modules are held to full branch coverage by their unit tests alone.
        cov = [f"--cov=wsproxy.{m}" for m in PURE_MODULES]
        step(
            [
                str(BIN / "python"),
                "-m",
                "pytest",
                "-q",
                "tests/unit",
                *cov,
                "--cov-branch",
                "--cov-report=term-missing:skip-covered",
                "--cov-fail-under=100",
            ],
            "pytest tests/unit --cov (pure modules, 100% branches)",
        )
        step([str(BIN / "python"), "-m", "pytest", *args], " ".join(["pytest", *args]))


if __name__ == "__main__":
    main(sys.argv[1:])

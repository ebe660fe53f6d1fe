"""Set-up commands for a fresh machine that has only Python 3.11 (standard library only).

    python3 dev.py demo [ARGS...]    wsproxy demo: an echo upstream with wsproxy in front of it
    python3 dev.py test              the full gate, what CI runs (.ci/run): Debian's
                                     rabbitmq-server for the AMQP tests when missing
                                     (.ci/install-rabbitmq.sh; when it cannot install, it
                                     says why and those tests skip with that reason),
                                     chart, alert rule and Dockerfile checks
                                     (.ci/chart-checks.sh, which installs helm, promtool,
                                     kubernetes-validate and hadolint the first time),
                                     ruff check, ruff format --check, mypy --strict wsproxy,
                                     then every test once: tests/unit under coverage (the
                                     pure modules need 100% of their branches from the unit
                                     tests alone), then the rest of the suite
    python3 dev.py test PYTEST...    only pytest with these arguments (e.g. -k keepalive)
    python3 dev.py bench [ARGS...]   python -m bench (see bench/__main__.py), after
                                     .ci/install-rabbitmq.sh (the AMQP benchmark needs a
                                     broker; bench runs even when that cannot install)

Each creates .venv in the project root when missing and installs the project into it
(editable, with only the extras it needs: none for demo, "test" for test); the install
is redone only when pyproject.toml changed since the last one or an extra is missing (a
stamp file in .venv holds the hash and the extras installed).
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
PURE_MODULES = (
    "frames",
    "keepalive",
    "http",
    "config",
    "exchange",
    "connection",
    "events.contract",
)


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
    # Extras installed before stay installed (pip removes nothing), so a reinstall
    # after pyproject.toml changed brings theirs up to date too.
    have = set(filter(None, stamped.split(",")))
    if stamped_digest == digest and extras <= have:
        return
    want = ",".join(sorted(extras | have))
    target = f".[{want}]" if want else "."
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--progress-bar", "off"]
    step([*pip, "-e", target], f"pip install -e '{target}'")
    STAMP.write_text(f"{digest} {want}\n")


def full_gate() -> None:
    """What CI runs; every test once, fail-fast."""
    # Exits 0 when it cannot install (the AMQP tests then skip with the reason): only a
    # failure of bash itself stops the gate here.
    step(["bash", ".ci/install-rabbitmq.sh"], "bash .ci/install-rabbitmq.sh")
    step(["bash", ".ci/chart-checks.sh"], "bash .ci/chart-checks.sh")
    step([str(BIN / "ruff"), "check", "."], "ruff check .")
    step([str(BIN / "ruff"), "format", "--check", "."], "ruff format --check .")
    step([str(BIN / "mypy"), "--strict", "wsproxy"], "mypy --strict wsproxy")
    pytest = [str(BIN / "python"), "-m", "pytest"]
    # The pure modules are held to full branch coverage by their unit tests alone, so
    # coverage runs over tests/unit only; the rest then runs without tracing overhead.
    cov = [f"--cov=wsproxy.{m}" for m in PURE_MODULES]
    step(
        [
            *pytest,
            "tests/unit",
            *cov,
            "--cov-branch",
            "--cov-report=term-missing:skip-covered",
            "--cov-fail-under=100",
        ],
        "pytest tests/unit --cov (pure modules: 100% of branches)",
    )
    step([*pytest, "--ignore=tests/unit"], "pytest --ignore=tests/unit (everything else)")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    command, args = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "demo":
        ensure_venv(set())
        print(f"==> wsproxy demo {' '.join(args)}".rstrip(), flush=True)
        os.execv(BIN / "wsproxy", ["wsproxy", "demo", *args])
    elif command == "bench":
        ensure_venv({"test", "bench"})
        # Not fatal: bench reports what it cannot run without a broker.
        run(["bash", ".ci/install-rabbitmq.sh"])
        shown = " ".join(["python -m bench", *args])
        sys.exit(run([str(BIN / "python"), "-m", "bench", *args], shown=shown))
    elif args:
        ensure_venv({"test"})
        shown = " ".join(["pytest", *args])
        sys.exit(run([str(BIN / "python"), "-m", "pytest", *args], shown=shown))
    else:
        ensure_venv({"test"})
        full_gate()


if __name__ == "__main__":
    main(sys.argv[1:])

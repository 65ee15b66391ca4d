"""CI check: requirements.txt installs into a fresh virtual environment as the remote build installs it, the result is
exactly the lock (constraints.txt), and the Functions app indexes its functions with nothing else installed.

    python .ci/fresh_install.py [--python PY] [--pip-option OPT ...]

pip uses this machine's configuration (index, wheel cache), so a second run takes seconds. Exit 0 when all holds;
1 with a message naming the file and the package otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements.txt"
LOCK = REPO / "constraints.txt"
BOOTSTRAP = {"pip", "setuptools", "wheel"}  # the venv's own tools, not the app's
# What the host does when it loads the app: import function_app and build every function's bindings.
INDEX_APP = "import function_app; print(len(function_app.app.get_functions()))"


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of -, _ and . do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line (comments, options and blank lines skipped)."""
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)\s*(;.*)?", line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def lock_problems(installed: Mapping[str, str], locked: Mapping[str, str], lock_name: str = "constraints.txt"
                  ) -> list[str]:
    """How a fresh install differs from the lock: a package it installed that the lock does not pin, at another
    version, or a pin nothing installed (stale)."""
    problems = []
    for name, version in sorted(installed.items()):
        if name in BOOTSTRAP:
            continue
        if name not in locked:
            problems.append(f"{name}=={version} was installed but {lock_name} does not pin it: add it")
        elif locked[name] != version:
            problems.append(f"{name} {version} was installed but {lock_name} pins {locked[name]}")
    for name in sorted(set(locked) - set(installed)):
        problems.append(f"{lock_name} pins {name}=={locked[name]} but nothing installs it: remove the pin")
    return problems


def _run(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


def check(python: str, pip_options: Sequence[str]) -> list[str]:
    """Install into a throwaway venv and return the problems found (empty: all good)."""
    with tempfile.TemporaryDirectory(prefix="fresh-venv-") as tmp:
        made = _run([python, "-m", "venv", tmp])
        if made.returncode:
            return [f"{python} -m venv failed: {made.stderr.strip()[-500:]}"]
        vpy = str(Path(tmp) / "bin" / "python")
        done = _run([vpy, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pip_options,
                     "-r", str(REQUIREMENTS)], cwd=REPO)
        if done.returncode:
            return [f"{REQUIREMENTS.name} does not install in a fresh venv:\n{done.stderr.strip()[-2000:]}"]
        frozen = _run([vpy, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"])
        problems = lock_problems(read_pins(frozen.stdout), read_pins(LOCK.read_text(encoding="utf-8")), LOCK.name)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        indexed = _run([vpy, "-c", INDEX_APP], cwd=REPO, env=env)
        if indexed.returncode:
            problems.append("function_app does not load with only requirements.txt installed (a runtime import of a "
                            f"package it does not name?):\n{indexed.stderr.strip()[-2000:]}")
        return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: this one)")
    parser.add_argument("--pip-option", action="append", default=[], help="passed to pip install (repeatable)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    problems = check(args.python, args.pip_option)
    for problem in problems:
        print(f"fresh install: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"fresh install: {REQUIREMENTS.name} installs exactly {LOCK.name} and the app indexes "
          f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

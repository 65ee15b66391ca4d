"""The runtime dependency lock: constraints.txt pins the whole installed tree of requirements.txt (transitive packages
included, azurefunctions-extensions-base among them), requirements.txt hands it to the remote build, and the CI check
that installs requirements.txt in a fresh venv (.ci/fresh_install.py) reports every way the two can drift apart."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _fresh_install() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fresh_install", REPO / ".ci" / "fresh_install.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fresh = _fresh_install()


def _top_level() -> list[Requirement]:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [Requirement(line.split("#", 1)[0]) for line in lines if line.strip() and line.lstrip()[0] not in "#-"]


def runtime_tree() -> dict[str, str]:
    """name -> installed version of requirements.txt and everything it needs on this platform (markers evaluated
    as pip evaluates them here: CPython 3.11/3.12 on Linux, no extras)."""
    env = default_environment()
    found: dict[str, str] = {}
    todo = _top_level()
    while todo:
        req = todo.pop()
        name = fresh.normalize(req.name)
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        found[name] = dist.version
        for raw in dist.requires or []:
            child = Requirement(raw)
            if child.marker is None or child.marker.evaluate({**env, "extra": ""}):
                todo.append(child)
    return found


def test_the_lock_pins_exactly_the_installed_runtime_tree() -> None:
    tree = runtime_tree()
    assert {"azurefunctions-extensions-base", "azure-core", "cryptography", "msal", "werkzeug"} <= set(tree)
    locked = fresh.read_pins((REPO / "constraints.txt").read_text(encoding="utf-8"))
    assert fresh.lock_problems(tree, locked) == []


def test_requirements_hand_the_lock_to_the_remote_build_and_agree_with_it() -> None:
    text = (REPO / "requirements.txt").read_text(encoding="utf-8")
    assert "-c constraints.txt" in [line.strip() for line in text.splitlines()]  # pip resolves it beside the file
    locked = fresh.read_pins((REPO / "constraints.txt").read_text(encoding="utf-8"))
    for req in _top_level():
        (spec,) = req.specifier
        assert spec.operator == "==", f"requirements.txt: {req} is not pinned"
        assert locked[fresh.normalize(req.name)] == spec.version, f"{req} disagrees with constraints.txt"
    assert "azurefunctions-extensions-base" in {fresh.normalize(r.name) for r in _top_level()}


def test_lock_problems_names_each_kind_of_drift() -> None:
    installed = {"a": "1.0", "b": "2.0", "c": "3.0", "pip": "23.2.1", "setuptools": "65.5.0"}
    locked = {"a": "1.0", "b": "2.1", "d": "4.0"}
    assert fresh.lock_problems(installed, locked) == [
        "b 2.0 was installed but constraints.txt pins 2.1",
        "c==3.0 was installed but constraints.txt does not pin it: add it",
        "constraints.txt pins d==4.0 but nothing installs it: remove the pin",
    ]
    assert fresh.read_pins("# c\n-c x.txt\nTyping_Extensions == 4.16.0  # why\nfoo>=1\n\nbar==2; sys_platform=='x'") \
        == {"typing-extensions": "4.16.0", "bar": "2"}


def test_the_fresh_install_check_fails_clearly_when_requirements_cannot_install(tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(REPO / ".ci" / "fresh_install.py"), "--pip-option=--no-index",
                           f"--pip-option=--find-links={empty}"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 1, done.stdout
    assert "fresh install: requirements.txt does not install in a fresh venv" in done.stderr
    assert "azure-functions" in done.stderr  # pip's own words name the package it could not find

"""A small mutation pass (`./dev mutate`): does the test suite notice when the product's code is subtly wrong?

For each target module it lists mutants with `ast` (comparison operators swapped, integer constants moved by one,
`and`/`or` swapped, `True`/`False` swapped, a `not` dropped, a returned value replaced by None, `+`/`-` swapped, one
element dropped from a tuple or set of constants), samples a bounded, seeded number of them, and runs each
against the module's own fast test files (`TARGETS`) with `-x` and a timeout. A mutant is killed when those tests
fail (or time out), and survives when they pass.

The working tree is never changed: the tree is copied once per worker into a temporary directory, and each mutant is
written into that copy (and put back) before its tests run there. One Azurite is started for the whole pass.
Known equivalent mutants are listed in tools/mutate_allow.txt with a reason; they are reported but not counted.

    .venv/bin/python -m tools.mutate [--modules contacts,batching] [--max-per-module 40] [--seed 13] [--jobs 2]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
ALLOWLIST = Path(__file__).resolve().parent / "mutate_allow.txt"

# module (under shared/) -> the test files that pin its behaviour; fast ones only (`-m "not slow"`)
# whole runs in this process against the sandbox: the run's limits, delta runs, several requests in flight
RUN = ("tests/test_run_limits.py", "tests/test_delta.py", "tests/test_in_flight.py")
LIFECYCLE = ("tests/test_orchestration.py", "tests/test_guarantees.py")  # claims, leases, resumes, pending jobs
TARGETS: dict[str, tuple[str, ...]] = {
    "contacts": ("tests/test_contacts.py",),
    "batching": ("tests/test_batching.py",),
    "sendgrid": ("tests/test_retry_policy.py", "tests/test_sendgrid_client.py"),
    "mirror": ("tests/test_mirror.py",),
    "config": ("tests/test_config.py",),
    "snapshots": ("tests/test_snapshots.py",),
    # the run's modules: its lifecycle (engine) and the stages it calls
    "engine": (*RUN, *LIFECYCLE),
    "stream": (*RUN, "tests/test_bulk.py", "tests/test_guarantees.py"),
    "report": RUN,
    "jobs": ("tests/test_jobs.py", *RUN, "tests/test_guarantees.py"),
    "sending": RUN,
}
DEFAULT_MODULES = ("contacts", "batching", "sendgrid", "mirror", "engine", "stream", "report", "jobs", "sending")

_SWAP_CMP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_CMP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
             ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}


@dataclass(frozen=True)
class Mutant:
    module: str  # "contacts"
    path: str  # "shared/contacts.py"
    line: int
    where: str  # the enclosing function or class, "Packer.add"
    original: str  # the source of the node before
    mutated: str  # and after
    index: int  # the mutated node's position in the module's walk (to apply it)
    variant: int  # which change of that node
    source_line: str  # the line it is on, stripped (an allowlist entry may name part of it: KEY @ TEXT)

    @property
    def key(self) -> str:
        """How the allowlist names it: no line number, which moves with every edit above it."""
        return f"{self.path}::{self.where}: {self.original} -> {self.mutated}"

    def label(self) -> str:
        return f"{self.path}:{self.line} ({self.where}): {self.original} -> {self.mutated}"


def _skipped(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, f-strings, `if TYPE_CHECKING:` blocks, `__all__`."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(first)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
            for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg,
                      node.args.kwarg]:
                if a is not None:
                    mark(a.annotation)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif (isinstance(node, ast.JoinedStr)  # an f-string's numbers are text (messages), not behaviour
              or (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
              or (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                       for t in node.targets))):
            mark(node)
    return skip


def _changes(node: ast.AST) -> list[tuple[ast.AST, str]]:
    """The mutated copies of one node, each with its source. Empty when the node is not a mutation point."""
    out: list[ast.AST] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _SWAP_CMP.get(type(op))
            if swap is not None:
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                out.append(new)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        out += [ast.Constant(node.value + 1), ast.Constant(node.value - 1)]
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        out.append(ast.Constant(not node.value))
    elif isinstance(node, ast.BoolOp):
        out.append(ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), copy.deepcopy(node.values)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(copy.deepcopy(node.operand))
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
        if not any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in (node.left, node.right)):
            new = copy.deepcopy(node)
            new.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            out.append(new)
    elif isinstance(node, ast.Return) and node.value is not None and not isinstance(node.value, ast.Constant):
        out.append(ast.Return(ast.Constant(None)))
    elif (isinstance(node, ast.Tuple | ast.Set) and len(node.elts) > 1
          and all(isinstance(e, ast.Constant) and type(e.value) in (str, int) for e in node.elts)):
        for i in range(len(node.elts)):
            new = copy.deepcopy(node)
            del new.elts[i]
            out.append(new)
    return [(n, _short(n)) for n in out]


def _short(node: ast.AST) -> str:
    text = ast.unparse(node).replace("\n", " ")
    return text if len(text) <= 90 else text[:87] + "..."


def _walk(tree: ast.Module) -> Iterator[tuple[ast.AST, str]]:
    """Every node with the name of its enclosing function or class, in a fixed order."""
    def visit(node: ast.AST, where: str) -> Iterator[tuple[ast.AST, str]]:
        yield node, where
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            where = f"{where}.{node.name}" if where != "<module>" else node.name
        for child in ast.iter_child_nodes(node):
            yield from visit(child, where)
    yield from visit(tree, "<module>")


def mutants_of(module: str) -> list[Mutant]:
    path = f"shared/{module}.py"
    source = (REPO / path).read_text()
    lines = source.splitlines()
    tree = ast.parse(source, path)
    skip = _skipped(tree)
    found: list[Mutant] = []
    for index, (node, where) in enumerate(_walk(tree)):
        if id(node) in skip:
            continue
        original = _short(node)
        line = getattr(node, "lineno", 0)
        for variant, (_, text) in enumerate(_changes(node)):
            found.append(Mutant(module, path, line, where, original, text, index, variant,
                                lines[line - 1].strip() if line else ""))
    return found


def allowlisted(m: Mutant, allowed: dict[str, str]) -> str | None:
    """The reason an allowlist entry gives for this mutant: `KEY`, or `KEY @ TEXT` when TEXT is on its line."""
    for entry, reason in allowed.items():
        key, _, text = entry.partition(" @ ")
        if key == m.key and text in m.source_line:
            return reason
    return None


def mutated_source(m: Mutant) -> str:
    """The module's source with the mutant applied (as ast.unparse writes it: comments go, behaviour stays)."""
    tree = ast.parse((REPO / m.path).read_text(), m.path)
    for index, (node, _) in enumerate(_walk(tree)):
        if index == m.index:
            target = node
            break
    else:
        raise LookupError(m.label())
    replacement = _changes(target)[m.variant][0]
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is target:
                setattr(parent, field, replacement)
                return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
            if isinstance(value, list) and any(v is target for v in value):
                value[next(i for i, v in enumerate(value) if v is target)] = replacement
                return ast.unparse(ast.fix_missing_locations(tree)) + "\n"
    raise LookupError(m.label())


def load_allowlist() -> dict[str, str]:
    """key -> reason, from lines `KEY  # reason`."""
    allowed: dict[str, str] = {}
    if ALLOWLIST.exists():
        for raw in ALLOWLIST.read_text().splitlines():
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            key, _, reason = raw.partition("  # ")
            allowed[key.strip()] = reason.strip()
    return allowed


# ---------------------------------------------------------------------------------------------------- running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def azurite(workdir: Path) -> Iterator[str]:
    """One Azurite for the whole pass (the tests use AZURITE_CONNECTION_STRING instead of starting their own)."""
    given = os.environ.get("AZURITE_CONNECTION_STRING")
    if given:
        yield given
        return
    ports = [_free_port() for _ in range(3)]
    binary = REPO / "node_modules" / ".bin" / "azurite"
    with open(workdir / "azurite.log", "wb") as log:
        proc = subprocess.Popen([str(binary), "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck",
                                 "--silent", "--blobHost", "127.0.0.1", "--blobPort", str(ports[0]), "--queuePort",
                                 str(ports[1]), "--tablePort", str(ports[2])], cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ports[0]), timeout=0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"Azurite did not start (see {workdir / 'azurite.log'})")
            time.sleep(0.1)
        account, key = "devstoreaccount1", ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPT"
                                            "Otr/KBHBeksoGMGw==")
        yield (f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
               f"BlobEndpoint=http://127.0.0.1:{ports[0]}/{account};QueueEndpoint=http://127.0.0.1:{ports[1]}/{account};")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def copy_tree(dest: Path) -> None:
    """The checkout as it is now (tracked and new files, not ignored ones), with the shared venv and node_modules."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for link in (".venv", "node_modules"):
        if (REPO / link).exists():
            (dest / link).symlink_to((REPO / link).resolve())


def run_tests(tree: Path, tests: tuple[str, ...], env: dict[str, str], timeout: float) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout', and the seconds it took."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-m", "not slow",
           "--no-header", "-o", "addopts=", *tests]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _RUNNING.add(proc)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", time.monotonic() - started
    finally:
        _RUNNING.discard(proc)
    return ("passed" if code == 0 else "failed"), time.monotonic() - started


_RUNNING: set[subprocess.Popen[bytes]] = set()  # test runs under way, stopped with the pass when it is interrupted


def _stop_running_quietly() -> None:
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _stop_running(*_: object) -> None:
    _stop_running_quietly()
    raise KeyboardInterrupt


@dataclass
class Pass:
    modules: list[str]
    sample: list[Mutant]  # to run
    equivalent: list[Mutant]  # sampled but allowlisted
    allowed: dict[str, str]


def choose(modules: list[str], per_module: int, seed: int, match: str | None) -> Pass:
    """The seeded sample of each module's mutants (all of them when per_module is 0), allowlisted ones apart."""
    allowed = load_allowlist()
    rng = random.Random(seed)
    chosen: list[Mutant] = []
    for module in modules:
        every = [m for m in mutants_of(module) if match is None or match in m.label()]
        mine = every if not per_module or len(every) <= per_module else rng.sample(every, per_module)
        mine.sort(key=lambda m: (m.line, m.index, m.variant))
        print(f"{module}: {len(every)} mutants, {len(mine)} sampled", flush=True)
        chosen += mine
    return Pass(modules, [m for m in chosen if allowlisted(m, allowed) is None],
                [m for m in chosen if allowlisted(m, allowed) is not None], allowed)


def _spread(items: Iterable[T], trees: list[Path], do: Callable[[Path, T], None]) -> None:
    """`do(tree, item)` for every item, one thread per tree taking the next item when it is free."""
    todo: queue.Queue[T] = queue.Queue()
    for item in items:
        todo.put(item)

    def worker(tree: Path) -> None:
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            do(tree, item)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in trees]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _baseline(plan: Pass, trees: list[Path], env: dict[str, str]) -> dict[tuple[str, ...], float] | None:
    """Each module's tests, unmutated, spread over the trees: they must pass, and their time sets the timeout."""
    times: dict[tuple[str, ...], float] = {}
    failed: list[tuple[str, ...]] = []

    def one(tree: Path, tests: tuple[str, ...]) -> None:
        outcome, seconds = run_tests(tree, tests, env, timeout=1800)
        if outcome != "passed":
            failed.append(tests)
        times[tests] = seconds
        print(f"baseline {' '.join(tests)}: {outcome} in {seconds:.1f} s", flush=True)

    _spread(dict.fromkeys(TARGETS[m] for m in plan.modules), trees, one)
    for tests in failed:
        print(f"these tests fail without any mutant, fix them first: {' '.join(tests)}")
    return None if failed else times


def execute(plan: Pass, jobs: int) -> dict[Mutant, str] | None:
    """Each mutant's outcome ('failed', 'timeout' or 'passed'); None when a module's tests fail unmutated."""
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp, azurite(Path(tmp)) as connection:
        env = {**os.environ, "AZURITE_CONNECTION_STRING": connection, "PYTHONDONTWRITEBYTECODE": "1"}
        trees = []
        for n in range(max(1, jobs)):
            tree = Path(tmp) / f"tree{n}"
            tree.mkdir()
            copy_tree(tree)
            trees.append(tree)
        baseline = _baseline(plan, trees, env)
        if baseline is None:
            return None

        results: dict[Mutant, str] = {}
        lock = threading.Lock()

        def one(tree: Path, m: Mutant) -> None:
            target = tree / m.path
            original = target.read_text()
            try:
                target.write_text(mutated_source(m))
                tests = TARGETS[m.module]
                outcome, seconds = run_tests(tree, tests, env, timeout=baseline[tests] * 3 + 30)
            finally:
                target.write_text(original)
            with lock:
                results[m] = outcome
                mark = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}[outcome]
                print(f"[{len(results)}/{len(plan.sample)}] {mark:16} {seconds:5.1f} s  {m.label()}", flush=True)

        _spread(plan.sample, trees, one)
    return results


def summary(plan: Pass, results: dict[Mutant, str], header: str) -> None:
    print(f"\n{header}")
    total = killed = 0
    for module in plan.modules:
        mine = [o for m, o in results.items() if m.module == module]
        k = sum(o != "passed" for o in mine)
        total, killed = total + len(mine), killed + k
        rate = f"{100 * k / len(mine):.0f}%" if mine else "-"
        print(f"  {module:10} {k:4} of {len(mine):4} killed  {rate}")
    print(f"  {'total':10} {killed:4} of {total:4} killed  {100 * killed / max(total, 1):.1f}%")
    if plan.equivalent:
        print(f"\nequivalent (tools/mutate_allow.txt, not counted): {len(plan.equivalent)}")
        for m in plan.equivalent:
            print(f"  {m.label()}  # {allowlisted(m, plan.allowed)}")
    survivors = sorted((m for m, o in results.items() if o == "passed"), key=lambda m: (m.path, m.line))
    if survivors:
        print(f"\nsurvivors ({len(survivors)}; the allowlist key of each after '|'):")
        for m in survivors:
            print(f"  {m.label()}\n    | {m.key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev mutate", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--modules", default=",".join(DEFAULT_MODULES),
                        help=f"comma-separated, of {', '.join(TARGETS)} (default: {','.join(DEFAULT_MODULES)})")
    parser.add_argument("--max-per-module", type=int, default=12, help="mutants sampled per module (0: all)")
    parser.add_argument("--seed", type=int, default=13, help="the sample's seed")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once, each in its own copy (default 2)")
    parser.add_argument("--match", help="only mutants whose description contains this text")
    parser.add_argument("--tests", help="comma-separated test files to run instead of each module's own (TARGETS)")
    parser.add_argument("--list", action="store_true", help="list the sampled mutants and stop")
    args = parser.parse_args(argv)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if m not in TARGETS]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.tests:
        for module in modules:
            TARGETS[module] = tuple(t.strip() for t in args.tests.split(",") if t.strip())
    plan = choose(modules, args.max_per_module, args.seed, args.match)
    if args.list:
        for m in plan.sample:
            print(" ", m.label())
        return 0
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _stop_running)  # a stopped pass leaves no test run, Azurite or copy behind
    try:
        results = execute(plan, args.jobs)
    except KeyboardInterrupt:
        _stop_running_quietly()
        print("mutation pass interrupted")
        return 130
    if results is None:
        return 2
    summary(plan, results, f"mutation pass: seed {args.seed}, up to {args.max_per_module} mutants per module, "
                           f"{(time.monotonic() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

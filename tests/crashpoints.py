"""Deterministic crash injection: SIGKILL a command right before, or right after, its N-th
file-system mutation made while a given phase runs.

Random kills rarely land in the few milliseconds between two renames, which is where
crash-safety bugs live. Here the child process counts its own file-system mutations while
a *phase* (a named entry point of the library) runs, and kills itself with SIGKILL at the
N-th one. Iterating N = 1, 2, ... until a run completes without reaching N visits every
step of the phase.

Counted (only in the process that entered the phase, only while it runs, nested calls too,
so a kill can land half-way through an `rmtree`):

    os.replace, os.rename, os.renames, os.unlink, os.remove, os.rmdir, os.removedirs,
    os.mkdir, os.makedirs, os.fsync, os.fdatasync, os.truncate, os.link, os.symlink,
    os.open / open / io.open for writing, shutil.rmtree, shutil.move,
    and the writers of the libraries underneath, which write from C and so bypass `open`:
    h5py.File opened for writing and its close (the flush), torch.save, faiss.write_index.

Nothing is faked: each call runs unchanged; the patch only decides when to die. The phases
are the public entry points the library keeps (`PHASES`), not its internals, so the
internals can be restructured freely.

Command line (one run)::

    python -m tests.crashpoints --phase finish --at 3 --when before [--log CALLS.txt] -- embed SRC --out C.h5 ...

`--at 0` counts without killing (the log then lists every counted call). `--serve` starts
a zygote for `Forker`: one interpreter that imported embedder once and forks a fresh child
per command, so the hundreds of short runs a sweep needs do not pay ~3.5 s of imports each.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Self

# phase name -> (module, attribute path) of the library entry point whose run is counted
PHASES = {
    "finish": ("embedder.cache.writer", "CacheWriter.finish"),
    "probe": ("embedder.learn.train", "run_probe"),
    "index": ("embedder.search.build", "build_index"),
    "update": ("embedder.search.update", "update_index"),
    "remove": ("embedder.search.removal", "remove_rows"),
}
WHEN = ("before", "after")

_OS_MUTATIONS = ("replace", "rename", "renames", "unlink", "remove", "rmdir", "removedirs", "mkdir", "makedirs",
                 "fsync", "fdatasync", "truncate", "link", "symlink")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_H5_WRITE_MODES = ("w", "w-", "x", "a", "r+")

# the real functions, captured before any patching: the injector's own bookkeeping uses them
_os_open, _os_write, _os_close, _os_kill = os.open, os.write, os.close, os.kill


class Injector:
    """Counts mutations while a phase runs and kills the process at the `at`-th (0: never)."""

    def __init__(self, at: int = 0, when: str = "before", log: str | None = None):
        if when not in WHEN:
            raise ValueError(f"when must be one of {WHEN}, got {when!r}")
        self.at, self.when = at, when
        self.count = 0
        self.depth = 0  # > 0 while a phase runs (phases may nest: merge -> CacheWriter.finish)
        self.owner = os.getpid()  # forked reader workers inherit the patches, not the counting
        self.busy = False
        self._log = _os_open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log else None

    def active(self) -> bool:
        return self.depth > 0 and not self.busy and os.getpid() == self.owner

    def step(self, name: str, args: tuple) -> int:
        """Number this call; returns its number."""
        self.busy = True
        try:
            self.count += 1
            if self._log is not None:
                _os_write(self._log, f"{self.count}\t{name}\t{_describe(args)}\n".encode(errors="replace"))
        finally:
            self.busy = False
        return self.count

    def maybe_kill(self, n: int, moment: str) -> None:
        if n == self.at and moment == self.when:
            _os_kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # SIGKILL cannot be caught; never reached


def _describe(args: tuple) -> str:
    cwd = os.getcwd() + os.sep
    out = []
    for a in args[:2]:
        if isinstance(a, (str, os.PathLike)):
            out.append(os.fspath(a).replace(cwd, ""))
        elif isinstance(a, int):
            out.append(repr(a))
        else:  # an h5py.File: name its file (unknown while it is being opened)
            try:
                out.append(os.fspath(a.filename).replace(cwd, ""))
            except Exception:  # noqa: BLE001 - a description must never break the call it describes
                out.append(type(a).__name__)
    return ", ".join(out)


def _counting(injector: Injector, name: str, func, is_write=None):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not injector.active() or (is_write is not None and not is_write(*args, **kwargs)):
            return func(*args, **kwargs)
        n = injector.step(name, args)
        injector.maybe_kill(n, "before")
        try:
            return func(*args, **kwargs)
        finally:
            injector.maybe_kill(n, "after")

    return wrapper


def _open_writes(file=None, mode="r", *args, **kwargs) -> bool:
    return any(c in str(mode) for c in "wax+")


def _os_open_writes(path=None, flags=0, *args, **kwargs) -> bool:
    return bool(flags & _WRITE_FLAGS)


def _h5_open_writes(self, name=None, mode="r", *args, **kwargs) -> bool:
    return mode in _H5_WRITE_MODES


def _h5_close_writes(self) -> bool:
    try:
        return bool(self.id) and self.mode == "r+"
    except Exception:  # noqa: BLE001 - an already-closed file has no mode
        return False


def _patch_libraries(injector: Injector) -> None:
    for name in _OS_MUTATIONS:
        if hasattr(os, name):
            setattr(os, name, _counting(injector, f"os.{name}", getattr(os, name)))
    os.open = _counting(injector, "os.open", os.open, _os_open_writes)
    builtins.open = io.open = _counting(injector, "open", io.open, _open_writes)
    shutil.rmtree = _counting(injector, "shutil.rmtree", shutil.rmtree)
    shutil.move = _counting(injector, "shutil.move", shutil.move)
    import h5py

    h5py.File.__init__ = _counting(injector, "h5py.File", h5py.File.__init__, _h5_open_writes)
    h5py.File.close = _counting(injector, "h5py.File.close", h5py.File.close, _h5_close_writes)
    import torch

    torch.save = _counting(injector, "torch.save", torch.save)
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency of embedder
        return
    faiss.write_index = _counting(injector, "faiss.write_index", faiss.write_index)


def _phase_wrapper(injector: Injector, func):
    @functools.wraps(func)
    def phase(*args, **kwargs):
        injector.depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            injector.depth -= 1

    return phase


def _patch_phase(injector: Injector, phase: str) -> None:
    module_name, attr_path = PHASES[phase]
    owner = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, attr)
    wrapped = _phase_wrapper(injector, original)
    setattr(owner, attr, wrapped)
    # A module that did `from module import entry_point` holds its own reference: replace those too.
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for key, value in list(namespace.items()):
            if value is original:
                namespace[key] = wrapped


def install(phase: str | None, at: int = 0, when: str = "before", log: str | None = None) -> Injector:
    """Patch this process: count (and at `at`, kill on) mutations made while `phase` runs."""
    import embedder.cli.main  # noqa: F401 - the library must be importable before its entry points are wrapped

    injector = Injector(at, when, log)
    if phase is not None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
        _patch_libraries(injector)
        _patch_phase(injector, phase)
    return injector


def run_cli(argv: list[str]) -> int:
    """`embedder ARGV` in this process, as the console script runs it; returns the exit code."""
    from embedder.cli.main import main as cli_main

    sys.argv = ["embedder", *argv]
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the exit code of an uncaught exception, as the interpreter gives
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return int(rc or 0)


# ------------------------------------------------------------------------------------------
# The zygote: import once, fork a fresh child per command
# ------------------------------------------------------------------------------------------


def _preload() -> None:
    """Import everything the commands use, so that children start at once. Runs no torch op:
    a process that has started OpenMP threads must not fork children that use torch."""
    for name in ("embedder.cli.main", "embedder.cli.commands", "embedder.extract.core", "embedder.learn.train", "embedder.search.build",
                 "embedder.cache.shards", "embedder.cli.pipeline", "embedder.learn.metrics", "embedder.data.samples", "h5py", "torch",
                 "faiss", "faiss.contrib.exhaustive_search", "matplotlib.pyplot", "sklearn.model_selection"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _child(request: dict, started: int) -> None:
    """In the forked child: own session, own output file, patches, the command. Never returns."""
    os.setsid()  # its session holds what it forks (reader workers): the client can kill them all
    _os_write(started, b"s")  # only now may the client be told the pid
    _os_close(started)
    fd = _os_open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _os_close(fd)
    try:
        os.chdir(request["cwd"])
        install(request.get("phase"), request.get("at", 0), request.get("when", "before"), request.get("log"))
        rc = run_cli(request["argv"])
    except BaseException:  # noqa: BLE001 - a child must end in os._exit, never return into the zygote
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def serve() -> None:
    """Read one JSON request per line from stdin; answer {"pid"} at once, then {"rc", ...} when it ends."""
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.monotonic()
        ready, started = os.pipe()
        pid = os.fork()
        if pid == 0:
            _os_close(ready)
            _child(request, started)
        _os_close(started)
        os.read(ready, 1)  # the child has its own session now (or has died trying)
        _os_close(ready)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": time.monotonic() - t0}), flush=True)


@dataclass
class Outcome:
    rc: int  # exit code; -9 = killed by SIGKILL
    output: str  # stdout and stderr together
    wall_s: float
    pid: int

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


class Forker:
    """Client of the zygote. `run` executes one `embedder` command line in a fresh forked child."""

    def __init__(self, env: dict[str, str] | None = None, logs: Path | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.crashpoints", "--serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.logs = Path(logs) if logs else Path(os.environ.get("TMPDIR", "/tmp"))
        self.runs = 0
        self._buffer = b""

    def _read(self, timeout: float) -> dict:
        """The zygote's next JSON line. Reads the raw pipe: a buffered reader would hide a second
        line from `select`."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no answer from the zygote within {timeout:.0f} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the zygote ended (exit {self.proc.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, phase: str | None = None, at: int = 0, when: str = "before",
              log: Path | None = None) -> int:
        """Start a child; returns its pid. Finish with `wait`."""
        self.runs += 1
        self._output = self.logs / f"forked-{self.proc.pid}-{self.runs}.out"  # one name space per zygote
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "phase": phase, "at": at, "when": when,
                   "log": str(log) if log else None, "output": str(self._output)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        self._pid = int(self._read(120)["pid"])
        return self._pid

    def poll(self, timeout: float) -> Outcome | None:
        """The child's outcome if it ends within `timeout` seconds, else None (it keeps running)."""
        try:
            done = self._read(timeout)
        except TimeoutError:
            return None
        output = self._output.read_text(errors="replace")
        self._output.unlink()
        return Outcome(done["rc"], output, done["wall_s"], self._pid)

    def wait(self, timeout: float = 300) -> Outcome:
        outcome = self.poll(timeout)
        if outcome is None:  # hung: kill it (and its reader workers) and say so
            os.killpg(self._pid, signal.SIGKILL)
            outcome = self.poll(30)
            outcome.rc = 124  # not an injected kill
            outcome.output += f"\n[crashpoints: killed after {timeout:.0f} s without an answer]"
        return outcome

    def run(self, argv: list[str], cwd: Path, phase: str | None = None, at: int = 0, when: str = "before",
            log: Path | None = None, timeout: float = 300) -> Outcome:
        self.start(argv, cwd, phase, at, when, log)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.crashpoints", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="run as the zygote of `Forker` (JSON lines on stdin)")
    parser.add_argument("--phase", choices=sorted(PHASES), help="count mutations while this entry point runs")
    parser.add_argument("--at", type=int, default=0, help="kill at this mutation (1-based; 0 = only count)")
    parser.add_argument("--when", choices=WHEN, default="before", help="kill right before or right after it")
    parser.add_argument("--log", help="append one line per counted mutation to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the embedder command line")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the embedder command line after --")
    install(args.phase, args.at, args.when, args.log)
    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())

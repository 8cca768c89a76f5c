"""The fast subset of the kill -9 torture harness (tests/torture.py; the full run: `python -m tests.torture`).

Commands run in children forked from one pre-imported interpreter (tests.crashpoints.Forker),
so a kill-and-rerun costs a fraction of a second instead of the ~3.5 s of imports a fresh
process pays; the last test uses real processes because it is about start-up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

from tests.conftest import alive, embedder_cmd, env_with_repo, make_tree
from tests.crashpoints import WHEN, Forker
from tests.torture import (
    LOCK_ERROR,
    ForkRunner,
    Tally,
    append_scenario,
    fast_flags,
    fresh_scenario,
    index_scenario,
    inject,
    judge_run,
    kill_session,
    prepare,
    prepare_injection,
    probe_scenario,
    random_kills,
    remove_scenario,
    session_pids,
    sync_scenario,
)

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.fixture(scope="module")
def forkers(tmp_path_factory):
    """Two zygotes: the before- and after-sweeps of a phase run side by side, one per core."""
    env = env_with_repo()
    env["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))  # never a user's weight cache
    # One intra-op thread: on a shared 2-core machine OpenMP's spin-waiting made each probe run
    # 7-10x slower with two (measured: 1.6-2.3 s against 0.22 s). Threads are not under test here.
    env["OMP_NUM_THREADS"] = "1"
    logs = tmp_path_factory.mktemp("forked")
    with Forker(env, logs=logs) as first, Forker(env, logs=logs) as second:
        yield first, second


@pytest.fixture
def forker(forkers):
    return forkers[0]


def _clean(tally: Tally) -> None:
    assert not tally.failures, f"{sum(tally.failures.values())} failed checks:\n{tally.report()}"


def test_random_kills_of_a_local_extraction_with_a_reader_worker(forker, tmp_path):
    sc = fresh_scenario("random", tmp_path, per_class=12, workers=1)
    _clean(prepare(sc, ForkRunner(forker), forker))
    tally = random_kills(sc, ForkRunner(forker), kills=4, rng=np.random.default_rng(0))
    assert tally.kills >= 3, "the kill moments must land while the run is alive"
    _clean(tally)
    assert tally.reruns_ok == tally.reruns == tally.kills and tally.finals_equal == tally.finals


def _sweep(make, tmp_path, forker, when: str, at_least: int) -> Tally:
    """Kill at every step of the phase, `when` (before/after) it; each kill rerun and checked."""
    sc = make(tmp_path / when)
    logs = tmp_path / when  # the counting logs of the two sweeps must not meet
    tally = prepare_injection(sc, forker, logs)
    if sc.calls < at_least:
        tally.fail(f"only {sc.calls} file-system mutations counted in phase {sc.phase}", "counting run")
    swept = inject(sc, forker, when, logs)
    if swept.kills != sc.calls:
        tally.fail(f"{swept.kills} kills for {sc.calls} steps", when)
    tally.add(swept)
    return tally


def _sweep_both(make, tmp_path, forkers, at_least: int) -> tuple[Tally, Tally]:
    """The before- and after-sweeps of one phase, side by side (one zygote each)."""
    with ThreadPoolExecutor(2) as pool:
        before, after = pool.map(lambda w: _sweep(make, tmp_path, forkers[WHEN.index(w)], w, at_least), WHEN)
    return before, after


def _failed(before: Tally, after: Tally) -> str:
    return "\n".join(f"kills {w} each step: {sum(t.failures.values())} failed checks\n{t.report()}"
                     for w, t in zip(WHEN, (before, after)) if t.failures)


def test_kill_at_every_step_of_finish_of_a_fresh_run(forkers, tmp_path):
    before, after = _sweep_both(lambda base: fresh_scenario("fresh", base, per_class=4), tmp_path, forkers,
                                at_least=8)
    assert not _failed(before, after), _failed(before, after)
    assert before.kills == after.kills >= 8  # one kill per counted step, before it and after it
    assert before.reruns_ok == before.kills and after.reruns_ok == after.kills


def test_kill_at_every_step_of_finish_of_an_append_run(forkers, tmp_path):
    before, after = _sweep_both(lambda base: append_scenario("append", base, per_class=2, grow=2, commit_every=4),
                                tmp_path, forkers, at_least=6)
    assert not _failed(before, after), _failed(before, after)
    assert before.kills == after.kills >= 6
    assert before.reruns_ok == before.kills and after.reruns_ok == after.kills


def test_kill_at_every_step_of_finish_of_a_sync_run(forkers, tmp_path):
    """Changed, gone and new files in one rerun: each kill's rerun ends bit-equal to an uninterrupted sync,
    with one live row per path."""
    before, after = _sweep_both(lambda base: sync_scenario("sync", base, per_class=3, grow=2, commit_every=4),
                                tmp_path, forkers, at_least=6)
    assert not _failed(before, after), _failed(before, after)
    assert before.kills == after.kills >= 6
    assert before.reruns_ok == before.kills and after.reruns_ok == after.kills


def test_random_kills_of_a_sync_run(forker, tmp_path):
    sc = sync_scenario("sync-random", tmp_path, per_class=10, grow=3, commit_every=4)
    _clean(prepare(sc, ForkRunner(forker), forker))
    assert sc.ref["out/c.h5"]["live_paths_unique"] and "row_state" in sc.ref["out/c.h5"]
    tally = random_kills(sc, ForkRunner(forker), kills=4, rng=np.random.default_rng(1))
    _clean(tally)
    assert tally.reruns_ok == tally.reruns == tally.kills


def test_kill_at_every_step_of_a_probe_saved_over_another_runs_probe(forkers, tmp_path):
    before, after = _sweep_both(lambda base: probe_scenario("probe", base, per_class=6, over_seed=1), tmp_path,
                                forkers, at_least=3)
    assert not _failed(before, after), _failed(before, after)
    assert before.kills == after.kills >= 3
    assert before.reruns_ok == before.kills and after.reruns_ok == after.kills


def test_kill_at_every_step_of_an_index_rebuilt_over_another_index(forkers, tmp_path):
    before, after = _sweep_both(lambda base: index_scenario("index", base, per_class=6, kind="ivf", over="flat"),
                                tmp_path, forkers, at_least=4)
    assert not _failed(before, after), _failed(before, after)
    assert before.kills == after.kills >= 4
    assert before.reruns_ok == before.kills and after.reruns_ok == after.kills


def test_kill_at_every_step_of_a_removal_from_an_index(forkers, tmp_path):
    """`--prune-missing` edits the folder in place of a build: staged, swapped in whole, files hard-linked."""
    before, after = _sweep_both(lambda base: remove_scenario("remove", base, per_class=6, kind="ivf"),
                                tmp_path, forkers, at_least=4)
    assert not _failed(before, after), _failed(before, after)
    assert before.kills == after.kills >= 4
    assert before.reruns_ok == before.kills and after.reruns_ok == after.kills


def _wait_for_rows(cache, running, timeout=600.0) -> None:
    """Until the cache at `cache` shows committed rows (read with plain h5py). `timeout` only
    guards against a hang: a busy machine may take long to get there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert running(), "the run ended before it committed anything"
        try:
            with h5py.File(cache, "r") as f:
                if int(f.attrs["committed_rows"]) > 0:
                    return
        except (OSError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError("no rows committed in time")


def test_immediate_rerun_after_kill_9_with_forked_reader_workers_is_not_locked_out(forker, tmp_path):
    """`kill -9` of the main process: its reader workers (which inherit its open files) are killed
    by the kernel when it dies (PR_SET_PDEATHSIG, embedder.data.workers), and a rerun at once must
    go ahead whether or not one of them is still on its way out.

    The workers are stopped (SIGSTOP) before the main process is killed, so none of them can finish
    its batch or exit on its own first: whatever happens to them is the kernel's doing."""
    sc = fresh_scenario("workers", tmp_path, per_class=30, workers=1)
    _clean(prepare(sc, ForkRunner(forker), forker))
    sc.reset()
    pid = forker.start(sc.argv, sc.root)
    try:
        _wait_for_rows(sc.root / "out/c.h5", lambda: alive(pid))
        workers = [p for p in session_pids(pid) if p != pid]
        assert workers, "the run should have a reader worker"
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
        os.kill(pid, signal.SIGKILL)
        assert forker.wait().killed
        rerun = forker.run(sc.argv, sc.root)
        # No reader outlives its run (issue 25): the kernel killed the stopped orphans with their parent.
        deadline = time.monotonic() + 120  # only a guard against a hang; it is over long before
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "an orphaned reader worker outlived its run"
    finally:
        kill_session(pid)  # SIGKILL ends stopped processes too
    if LOCK_ERROR in rerun.output:
        pytest.fail(f"the rerun was locked out by the killed run's orphaned reader worker: {rerun.output.strip()}")
    tally = Tally()
    judge_run(sc, rerun, tally, "immediate rerun")
    _clean(tally)


def test_second_embed_into_the_same_out_is_refused_at_once_naming_the_holder(tmp_path):
    """Refused before any model is built, with the holder's pid in the message. "At once" is
    proved by what the second process did, not by a stopwatch (a busy machine stretches any
    time): it exits while the holder still runs, and it never imported torch, so it cannot have
    built a model or read an image."""
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=150, seed=4)
    out = tmp_path / "c.h5"
    argv = embedder_cmd("embed", str(src), "--out", str(out), *fast_flags(image_size=160))
    env = env_with_repo()
    holder_env = {**env, "OMP_NUM_THREADS": "1"}  # leave the second core to the process under test
    holder = subprocess.Popen(argv, env=holder_env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for_rows(out, lambda: holder.poll() is None)
        second = subprocess.run(_reporting_torch(argv), check=False, env=env, capture_output=True, text=True,
                                timeout=600)  # a guard against a hang, not a measure
        assert holder.poll() is None, "the holder must still be running for the test to mean anything"
    finally:
        kill_session(holder.pid)
        holder.wait()
    said = (second.stdout + second.stderr).strip()
    problems = []
    if second.returncode == 0 or not re.search(r"lock|another embedder process", said, re.IGNORECASE):
        problems.append(f"not refused for the lock (exit {second.returncode})")
    if str(holder.pid) not in said:
        problems.append(f"the message does not name the holder's pid {holder.pid}")
    if "torch imported" in said:
        problems.append("it imported torch before refusing (the lock must come first)")
    elif "torch not imported" not in said:
        problems.append("it did not report whether it imported torch")
    assert not problems, f"{'; '.join(problems)}. It said: {said}"


def _reporting_torch(argv: list[str]) -> list[str]:
    """`python -m embedder ARGS` as a program that runs the same main() and then says on stderr
    whether torch was imported."""
    python, _, _, *args = argv
    code = ("import sys\n"
            "from embedder.cli.main import main\n"
            "code = main(sys.argv[1:])\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n"
            "sys.exit(code)\n")
    return [python, "-c", code, *args]

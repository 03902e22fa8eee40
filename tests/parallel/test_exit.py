"""``exit_process``: after a process group, the useful part of the exit still happens."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import atexit, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    from parallel.dist import exit_process

    release = threading.Event()

    def writer():  # a non-daemon thread with work left, as the tracker's writer
        release.wait()
        print("thread finished", flush=False)

    threading.Thread(target=writer).start()
    pool = ThreadPoolExecutor(1)  # an idle executor worker must not keep the exit waiting
    pool.submit(lambda: None).result()
    atexit.register(lambda: print("atexit ran", flush=False))
    print("buffered output", end="\\n", flush=False)
    release.set()
    exit_process(int(sys.argv[1]))
    print("never printed")
    """
)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_joins_threads_runs_atexit_and_keeps_the_code(world_size: str) -> None:
    env = {**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["buffered output", "thread finished", "atexit ran"], proc.stdout

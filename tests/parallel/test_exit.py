"""``exit_process`` / ``run_and_exit``: after a process group, the useful part of the exit still
happens (threads joined, atexit handlers run, output flushed) and the exit code is kept."""

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
    from parallel.dist import run_and_exit

    release = threading.Event()

    def writer():  # a non-daemon thread with work left
        release.wait()
        print("thread finished", flush=False)

    def main():
        threading.Thread(target=writer).start()
        pool = ThreadPoolExecutor(1)  # an idle executor worker must not keep the exit waiting
        pool.submit(lambda: None).result()
        atexit.register(lambda: print("atexit ran", flush=False))
        print("buffered output", flush=False)
        release.set()
        how = sys.argv[1]
        if how == "raise":
            raise RuntimeError("boom")
        if how == "message":
            sys.exit("stopped: a message")
        return int(how)

    run_and_exit(main)
    print("never printed")
    """
)


@pytest.mark.parametrize(
    "world_size, how, code, stderr",
    [
        ("1", "3", 3, ""),  # no process group: the ordinary exit, same behaviour
        ("2", "3", 3, ""),
        ("2", "0", 0, ""),
        ("2", "raise", 1, "RuntimeError: boom"),
        ("2", "message", 1, "a message"),
    ],
)
def test_exit_keeps_code_output_threads_and_atexit(
    world_size: str, how: str, code: int, stderr: str
) -> None:
    env = {**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, how], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.splitlines() == ["buffered output", "thread finished", "atexit ran"], (
        proc.stdout
    )
    assert stderr in proc.stderr

"""The ``deepspeed`` launcher, with SIGTERM / SIGINT delivered to the training processes.

    python -m launch.deepspeed_run --num_gpus 2 launch/train.py --config ... parallel.backend=deepspeed

takes exactly the arguments of ``deepspeed`` (``deepspeed.launcher.runner``). Why: on one node
the runner installs no signal handler (only its multi-node pdsh mode does), so a SIGTERM sent to
it ends it at once while its ``deepspeed.launcher.launch`` child and the workers train on to the
end; a signal to the whole process group instead reaches ``launch``, which terminates the
workers a second time and kills them 30 s later, whether or not their checkpoint is written.

This wrapper starts the runner in its own session (so a terminal's Ctrl-C or a signal to the
wrapper's group reaches only the wrapper) and forwards SIGTERM and SIGINT to the worker
processes alone (the children of each local ``deepspeed.launcher.launch``). The trainer then
checkpoints on every rank and exits 0, ``launch`` and the runner exit with the workers' code,
and so does this wrapper: 0 means "stopped and saved". A signal that comes before the workers
exist is forwarded as soon as they appear; if no local workers appear within
``FALLBACK_S`` (multi-node launchers start them elsewhere), it goes to the runner, whose own
multi-node handling applies.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from typing import Any

logger = logging.getLogger("launch.deepspeed_run")

FORWARDED = (signal.SIGTERM, signal.SIGINT)
LAUNCH_MODULE = "deepspeed.launcher.launch"
POLL_S = 0.2
FALLBACK_S = 10.0


def local_workers(runner_pid: int) -> list[Any]:
    """The training processes: children of every local ``deepspeed.launcher.launch`` process
    under ``runner_pid`` (``psutil.Process`` objects; empty while none exist yet)."""
    import psutil

    try:
        descendants = psutil.Process(runner_pid).children(recursive=True)
    except psutil.Error:
        return []
    workers = []
    for proc in descendants:
        try:
            if LAUNCH_MODULE in proc.cmdline():
                workers.extend(proc.children())
        except psutil.Error:  # it ended while we looked
            continue
    return workers


def _send(procs: list[Any], signum: int) -> int:
    import psutil

    sent = 0
    for proc in procs:
        try:
            proc.send_signal(signum)
            sent += 1
        except psutil.Error:
            pass
    return sent


def run(runner_args: list[str]) -> int:
    """Run the deepspeed runner with ``runner_args``, forwarding stop signals; its exit code."""
    pending: list[int] = []
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: pending.append(signum))
    runner = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", *runner_args], start_new_session=True
    )
    first_pending = None
    while runner.poll() is None:
        if pending:
            first_pending = first_pending or time.monotonic()
            workers = local_workers(runner.pid)
            if workers:
                name = signal.Signals(pending[0]).name
                sent = _send(workers, pending.pop(0))
                logger.warning("forwarded %s to %d DeepSpeed worker(s)", name, sent)
                first_pending = None
            elif time.monotonic() - first_pending > FALLBACK_S:
                signum = pending.pop(0)
                logger.warning(
                    "no local DeepSpeed workers after %.0f s: %s goes to the deepspeed runner",
                    FALLBACK_S,
                    signal.Signals(signum).name,
                )
                runner.send_signal(signum)
                first_pending = None
        time.sleep(POLL_S)
    code = runner.returncode
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

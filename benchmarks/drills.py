"""Fault drills: real training processes, real signals at random moments, N trials each.

Run:  python benchmarks/drills.py                         # every drill, 5 trials (make drills)
      python benchmarks/drills.py --quick                 # 1 trial of 3 cheap drills (smoke)
      python benchmarks/drills.py --only kill9_restart --trials 10 --seed 1234

Every trial trains the tiny config (2 blocks with every component, 64-token rows, 12 steps, a
checkpoint every 2) in a fresh run directory, through the real entry point
(``python -m launch.train``, under ``torchrun`` with 2 gloo ranks where the drill says so), and
hurts it from outside while it runs:

  sigterm             SIGTERM to the one process at a random moment; rerun the same command
  sigterm_torchrun    SIGTERM to the torchrun agent, to one rank, or to all of them at once (what
                      SLURM does) at a random moment; rerun
  kill9_restart       SIGKILL of a random rank at a random moment under torchrun --max-restarts=2
                      (static or c10d rendezvous); no rerun: torchrun must recover by itself
  corrupt_checkpoint  truncate / flip bytes in / delete a random file of the newest checkpoint of
                      a finished run cut back to a random step; rerun
  corrupt_shard       damage a random shard of a small prepared dataset (truncate, flip a byte of a
                      sample, flip any byte with data.verify_sha256, delete the tar); train with
                      data.on_corrupt=skip, then with on_corrupt=error
  disk_full           run.dir on a tmpfs of random size (64 KiB - 12 MiB; mounting needs the right
                      to mount, else the drill reports itself skipped); then more space and a rerun
  mlflow_outage       tracking.uri on a port nobody listens on, or on a listener that never
                      answers (killed mid-run or not), or the run's own SQLite store locked by
                      another process from a random step (released later or never; then a rerun)

A moment is a phase (start-up, training, closing) and a point in it: a time after launch, or a
step line of rank 0's output plus a delay up to one step (timed on the uninterrupted reference
run), so signals land before the handler exists, mid-step, mid-checkpoint and during the exit.
What a trial checks does not depend on where the signal landed or on the machine's speed: every
path must end with the uninterrupted run's losses (bitwise), each step once in metrics.jsonl,
``exit_status.json`` saying ``finished``, and every checkpoint directory complete (its manifest's
sizes and sha256 sums). The signalled start is classified by its exit status (the notes count
the classes); a signal that finds no handler yet may kill a process, which must have saved
nothing then.

Randomness: one seed (``--seed``, else drawn and recorded); trial i of drill D draws from
``random.Random(f"{seed}-{D}-{i}")``, and the categorical choices (the phase, the target, the
kind of damage or outage) go through their options in an order seeded by (seed, D), so a few
trials meet each of them. ``--only D --seed S`` repeats the same choices (not the same timings). Output: a progress bar, the table (drill, trials, passed, failed, notes), JSON
(``--out``, default docs/results/drills.json: settings, machine, every trial's choices,
outcome, problems and, when it failed, its output tail) and the table as Markdown next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    _here = Path(__file__).resolve().parent  # benchmarks/kernels.py would shadow ``kernels``
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pretrain.checkpoint import files  # noqa: E402
from pretrain.exit_status import read_exit_status  # noqa: E402
from pretrain.history import read_metrics  # noqa: E402

TINY = str(REPO / "configs" / "hydra-tiny.yaml")
STEPS = 12
# the tiny model cut to 2 blocks with every component; a checkpoint every 2 steps, 6 kept (the
# corrupt-checkpoint drill cuts a finished run back to any of them)
BASE = [
    "model.n_layers=2",
    "model.workspace.after_blocks=[1]",
    "model.pkm.after_blocks=[0]",
    f"train.steps={STEPS}",
    "train.seq_len=64",
    "train.warmup_steps=2",
    "train.log_every=1",
    "tracking.enabled=false",
    "run.plot=false",
    "curriculum.stages=[]",
    "checkpoint.every=2",
    "checkpoint.keep_last=6",
]
LAYOUTS = {
    "single": ["train.batch_size=4"],
    "torchrun": ["train.batch_size=2", "parallel.backend=ddp"],
}
STEP_LINE = re.compile(r"^step\s+(\d+) \|")
PHASES = ("startup", "training", "training", "closing")  # training twice: half the moments


# ----------------------------------------------------------------------------- one trial


@dataclass
class Trial:
    """One randomised trial: its choices, what happened, and what did not hold."""

    drill: str
    index: int
    seed: str  # of the whole session
    dir: Path
    params: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""  # a short class of what happened, counted in the table's notes
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    logs: dict[str, str] = field(default_factory=dict)  # output tails, kept when it failed
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}-{self.drill}-{self.index}")

    def pick(self, name: str, options: list[Any]) -> Any:
        """One of ``options``, recorded as ``params[name]``: a drill's trials take them in a
        seeded random order, so a few trials meet each of them (``rng.choice`` might not)."""
        order = random.Random(f"{self.seed}-{self.drill}-{name}").sample(options, len(options))
        self.params[name] = order[self.index % len(order)]
        return self.params[name]

    @property
    def passed(self) -> bool:
        return not self.problems and self.skipped is None

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def record(self) -> dict[str, Any]:
        return {
            "drill": self.drill,
            "trial": self.index,
            "seed": f"{self.seed}-{self.drill}-{self.index}",
            "params": self.params,
            "outcome": self.outcome,
            "passed": self.passed,
            "skipped": self.skipped,
            "problems": self.problems,
            "wall_s": round(self.wall_s, 2),
            **({"logs": self.logs} if self.problems else {}),
        }


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    for name in ("HYDRA_TEST_FAULT", "MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def handles_sigterm(pid: int) -> bool | None:
    """Whether the process has a SIGTERM handler now (bit 15 of SigCgt); None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        return None
    return None


class Training:
    """One launch of the trainer (alone or under torchrun), read as it runs: rank 0's step lines
    are timed (to aim a signal at a step) and every descendant is recorded (torchrun starts each
    rank in a session of its own, so only their pids can clean them up)."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd = cmd
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=REPO, start_new_session=True, errors="replace",
        )  # fmt: skip
        self.lines: list[str] = []
        self.step_times: dict[int, float] = {}  # step -> seconds after launch (first time seen)
        self.seen: dict[int, psutil.Process] = {}
        self._eof = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._read, self._watch)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                if match := STEP_LINE.match(line):
                    self.step_times.setdefault(int(match[1]), time.monotonic() - self.start)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _watch(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            while self.proc.poll() is None:
                for child in root.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
                time.sleep(0.05)
        except psutil.Error:  # the launcher is gone
            pass

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_step(self, step: int, timeout: float) -> bool:
        """Wait until rank 0 printed ``step`` (False: the output ended first, or the timeout)."""
        with self._cond:
            self._cond.wait_for(lambda: step in self.step_times or self._eof, timeout)
            return step in self.step_times

    def wait_until(self, seconds_after_launch: float) -> bool:
        """Sleep until that time after launch; False when the process ended before it."""
        try:
            self.proc.wait(max(0.0, self.start + seconds_after_launch - time.monotonic()))
            return False
        except subprocess.TimeoutExpired:
            return True

    def ranks(self) -> dict[int, psutil.Process]:
        """The live ranks under torchrun, by their RANK."""
        found = {}
        try:
            for child in psutil.Process(self.proc.pid).children():
                rank = child.environ().get("RANK")
                if rank is not None:
                    found[int(rank)] = child
        except psutil.Error:
            pass
        return found

    def finish(self, timeout: float) -> tuple[int | None, list[str]]:
        """Wait for the exit: (exit code or None on timeout, processes left behind, killed)."""
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        procs = list(self.seen.values())
        if code is None:  # timed out: the launcher goes too
            procs.insert(0, psutil.Process(self.proc.pid))
        left = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(proc.cmdline()[-3:]) or str(proc.pid))
                    proc.kill()
            except psutil.Error:
                pass
        for thread in self._threads:
            thread.join(10)
        return code, left


def train_command(
    run_dir: Path,
    overrides: list[str],
    layout: str,
    max_restarts: int = 0,
    rendezvous: str = "static",
) -> list[str]:
    """``launch.train`` on the tiny drill config, alone or as 2 gloo ranks under torchrun."""
    entry = ["-m", "launch.train", "--config", TINY, *BASE, *LAYOUTS[layout], *overrides]
    entry.append(f"run.dir={run_dir}")
    if layout == "single":
        return [sys.executable, *entry]
    port = free_port()
    if rendezvous == "c10d":
        rdzv = ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=drill"]
    else:
        rdzv = ["--master_addr=127.0.0.1", f"--master_port={port}"]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--max-restarts={max_restarts}", *rdzv, *entry,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- moments and signals


@dataclass
class Reference:
    """The uninterrupted run of a layout: its losses and its timing (to place random moments)."""

    dir: Path
    losses: list[float]
    first_step_s: float  # launch to rank 0's first step line
    step_s: float  # mean time between step lines (checkpoints included)
    close_s: float  # last step line to the exit


def draw_moment(rng: random.Random, ref: Reference, phase: str) -> dict[str, Any]:
    """A random moment of ``phase``: a time in start-up, a step plus a delay of up to a step, or
    a delay after the last step."""
    if phase == "startup":
        return {"phase": phase, "after_s": round(rng.uniform(0, ref.first_step_s), 3)}
    step = rng.randint(1, STEPS - 1) if phase == "training" else STEPS
    span = ref.step_s if phase == "training" else ref.close_s
    return {"phase": phase, "after_step": step, "delay_s": round(rng.uniform(0, span), 3)}


def wait_for(run: Training, moment: dict[str, Any], timeout: float) -> bool:
    """Wait for ``moment``; False when the process ended first (nothing is sent then)."""
    if moment["phase"] == "startup":
        return run.wait_until(moment["after_s"])
    if not run.wait_step(moment["after_step"], timeout):
        return False
    time.sleep(moment["delay_s"])
    return run.proc.poll() is None


def send(run: Training, target: str, sig: signal.Signals, timeout: float) -> dict[str, Any]:
    """Send ``sig`` to ``target``: ``main`` (the one training process), ``agent`` (torchrun),
    ``rank0``/``rank1`` (waiting for it to exist) or ``all`` (agent and ranks, as SLURM does).
    Returns which processes got it and whether each had a SIGTERM handler at that moment."""
    procs = []
    if target in ("main", "agent", "all"):
        procs.append(("main" if target == "main" else "agent", psutil.Process(run.proc.pid)))
    if target == "all":
        procs += [(f"rank{r}", p) for r, p in sorted(run.ranks().items())]
    if target.startswith("rank"):
        deadline = time.monotonic() + timeout
        while (rank := run.ranks().get(int(target[4:]))) is None:
            if run.proc.poll() is not None or time.monotonic() > deadline:
                return {"sent_to": [], "handlers": []}
            time.sleep(0.01)
        procs.append((target, rank))
    sent, handlers, at_s = [], [], round(time.monotonic() - run.start, 3)
    for name, proc in procs:
        handler = handles_sigterm(proc.pid)
        try:
            proc.send_signal(sig)
        except psutil.Error:
            continue
        sent.append(name)
        handlers.append(handler)
    return {"sent_to": sent, "handlers": handlers, "at_s": at_s}


def signal_at(
    run: Training, moment: dict[str, Any], target: str, sig: signal.Signals, timeout: float
) -> dict[str, Any]:
    """``send`` at ``moment`` (nothing when the process ended first)."""
    if wait_for(run, moment, timeout):
        return send(run, target, sig, timeout)
    return {"sent_to": [], "handlers": []}


# ----------------------------------------------------------------------------- checks


def checkpoint_problems(run_dir: Path) -> list[str]:
    """Every ``step_*`` directory complete (manifest; each file's size and sha256), and
    ``latest``, if present, naming one of them."""
    root = run_dir / "checkpoints"
    problems = []
    for path in files.step_dirs(root):
        try:
            manifest = files.read_manifest(path)
        except ValueError as err:
            problems.append(f"{path.name}: {err}")
            continue
        for name, record in manifest["files"].items():
            if found := files.check_file(path / name, record, verify_hash=True):
                problems.append(f"{path.name}: {found}")
    if (root / files.LATEST).exists():
        latest = files.read_latest(root)
        if latest is None or not (root / latest).is_dir():
            problems.append(f"latest names {latest!r}, which is not a checkpoint directory")
    return problems


def logged_steps(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return [int(r["step"]) for r in rows], [r["loss"] for r in rows]


def check_finished(
    trial: Trial, code: int | None, output: str, run_dir: Path, ref: Reference
) -> None:
    """The run ended as the uninterrupted one: exit 0, ``finished``, every step once, the same
    losses bitwise, every checkpoint complete. ``output``: the last start's, kept on failure."""
    label = f"{run_dir.name} final start"
    if not trial.check(code == 0, f"{label}: exit code {code}"):
        trial.logs[label] = output[-3000:]
    status = read_exit_status(run_dir) or {}
    trial.check(status.get("status") == "finished", f"{label}: exit_status {status or 'missing'}")
    steps, losses = logged_steps(run_dir)
    if trial.check(steps == list(range(1, STEPS + 1)), f"metrics.jsonl steps are {steps}"):
        differ = [(s, a, b) for s, a, b in zip(steps, losses, ref.losses) if a != b]
        if differ:
            step, got, want = differ[0]
            trial.check(False, f"loss at step {step} is {got!r}, uninterrupted {want!r}")
    for problem in checkpoint_problems(run_dir):
        trial.check(False, f"checkpoint: {problem}")


def classify_stop(trial: Trial, code: int | None, run_dir: Path, sent: dict[str, Any]) -> None:
    """How the signalled start ended: a saved stop, a finish, or (a signalled process had no
    handler yet) a death with nothing written. A saved stop must exit 0 unless the torchrun
    agent itself was signalled (it then exits 1: documented)."""
    status = read_exit_status(run_dir)
    trial.params["first_exit_code"] = code
    trial.params["exit_status"] = status and {
        k: status.get(k) for k in ("status", "step", "checkpoint_step", "signal")
    }
    unhandled = False in sent.get("handlers", [])
    state = status["status"] if status else None
    if not sent["sent_to"]:
        trial.outcome = "process ended before the moment"
    elif state == "preempted":
        step, saved = status["step"], status.get("checkpoint_step")
        trial.check(saved == (step or None), f"preempted at step {step}, saved {saved}")
        if saved:
            path = run_dir / "checkpoints" / files.step_dir_name(saved)
            trial.check(path.is_dir(), f"{path.name} named by exit_status.json is missing")
        trial.outcome = "preempted mid-run, saved" if step else "preempted before step 1"
    elif state == "finished":
        trial.outcome = "finished before the signal took effect"
        if code == -signal.SIGTERM:  # Python restores SIG_DFL as it finalizes
            trial.outcome = "finished, then killed by it during interpreter exit"
    elif unhandled and state in (None, "running", "failed"):
        ckpts = [p.name for p in files.step_dirs(run_dir / "checkpoints")]
        trial.check(not ckpts, f"died before its handler, yet checkpoints {ckpts}")
        trial.outcome = f"signal before the handler: died, nothing saved (status {state})"
    else:
        trial.check(False, f"first start ended as {status} (exit code {code}, sent {sent})")
    if state == "preempted" and "agent" not in sent["sent_to"] or state == "finished":
        trial.check(code in (0, -signal.SIGTERM), f"first start ({state}): exit code {code}")
    for problem in checkpoint_problems(run_dir):
        trial.check(False, f"after the signal: {problem}")


# ----------------------------------------------------------------------------- the drills


class Drills:
    """Shared state of one drill session: references, the prepared dataset, the tmpfs check."""

    def __init__(self, work: Path, timeout: float) -> None:
        self.work = work
        self.timeout = timeout
        self._references: dict[str, Reference] = {}
        self._dataset: Path | None = None

    def launch(
        self, run_dir: Path, overrides: list[str], layout: str = "single", env=None, **kw
    ) -> Training:
        return Training(train_command(run_dir, overrides, layout, **kw), child_env(**(env or {})))

    def reference(self, layout: str) -> Reference:
        """The uninterrupted run of ``layout`` (trained once per session)."""
        if layout not in self._references:
            run_dir = self.work / f"reference-{layout}"
            run = self.launch(run_dir, [], layout)
            code, _ = run.finish(self.timeout)
            if code != 0:
                raise RuntimeError(f"reference run failed ({code}):\n{run.output[-3000:]}")
            times = run.step_times
            self._references[layout] = Reference(
                dir=run_dir,
                losses=logged_steps(run_dir)[1],
                first_step_s=times[1],
                step_s=(times[STEPS] - times[1]) / (STEPS - 1),
                close_s=time.monotonic() - run.start - times[STEPS],
            )
        return self._references[layout]

    def dataset(self) -> Path:
        """A small prepared dataset (byte tokenizer, 64-token windows, ~12 shards), made once."""
        if self._dataset is None:
            self._dataset = prepare_small_dataset(self.work / "dataset")
        return self._dataset


def drill_sigterm(ctx: Drills, trial: Trial) -> None:
    ref = ctx.reference("single")
    run_dir = trial.dir / "run"
    moment = trial.params["moment"] = draw_moment(trial.rng, ref, trial.pick("phase", PHASES))
    first = ctx.launch(run_dir, [])
    sent = trial.params["sent"] = signal_at(first, moment, "main", signal.SIGTERM, ctx.timeout)
    code, _ = first.finish(ctx.timeout)
    trial.logs["first start"] = first.output[-3000:]
    classify_stop(trial, code, run_dir, sent)
    second = ctx.launch(run_dir, [])
    code, _ = second.finish(ctx.timeout)
    check_finished(trial, code, second.output, run_dir, ref)


def drill_sigterm_torchrun(ctx: Drills, trial: Trial) -> None:
    ref = ctx.reference("torchrun")
    run_dir = trial.dir / "run"
    target = trial.pick("target", ["agent", "rank0", "rank1", "all"])
    moment = trial.params["moment"] = draw_moment(trial.rng, ref, trial.pick("phase", PHASES))
    first = ctx.launch(run_dir, [], "torchrun")
    sent = trial.params["sent"] = signal_at(first, moment, target, signal.SIGTERM, ctx.timeout)
    code, left = first.finish(ctx.timeout)
    trial.logs["first start"] = first.output[-3000:]
    trial.check(not left, f"processes left running after torchrun exited: {left}")
    classify_stop(trial, code, run_dir, sent)
    if "agent" in sent["sent_to"]:
        trial.params["torchrun_exit_code_when_signalled"] = code
    second = ctx.launch(run_dir, [], "torchrun")
    code, left = second.finish(ctx.timeout)
    trial.check(not left, f"rerun left processes running: {left}")
    check_finished(trial, code, second.output, run_dir, ref)


def drill_kill9_restart(ctx: Drills, trial: Trial) -> None:
    ref = ctx.reference("torchrun")
    run_dir = trial.dir / "run"
    target = trial.pick("target", ["rank0", "rank1"])
    rendezvous = trial.params["rendezvous"] = trial.rng.choice(["static", "c10d"])
    moment = trial.params["moment"] = draw_moment(trial.rng, ref, trial.pick("phase", PHASES))
    # LOGLEVEL=INFO: torchrun's agent then logs each restart ("will restart worker group")
    run = ctx.launch(
        run_dir, [], "torchrun", {"LOGLEVEL": "INFO"}, max_restarts=2, rendezvous=rendezvous
    )
    sent = trial.params["sent"] = signal_at(run, moment, target, signal.SIGKILL, ctx.timeout)
    code, left = run.finish(ctx.timeout)
    out = run.output
    restarts = out.count("will restart worker group")
    resumed = re.findall(r"resumed from step (\d+)", out)
    trial.params.update(restarts=restarts, resumed_from=[int(s) for s in resumed])
    trial.check(not left, f"processes left running after torchrun exited: {left}")
    if not sent["sent_to"]:
        trial.outcome = "process ended before the moment"
    elif restarts == 0:
        trial.outcome = "the rank had already finished"
    else:
        trial.outcome = "restarted, resumed" if resumed else "restarted from step 0"
    trial.check(restarts <= 1, f"{restarts} restarts for one kill")
    check_finished(trial, code, run.output, run_dir, ref)
    if trial.problems:
        trial.logs["torchrun"] = out[-6000:]


def damage_file(rng: random.Random, path: Path, how: str) -> dict[str, Any]:
    """Truncate ``path`` to a random shorter length, flip 1-8 random bytes, or delete it."""
    size = path.stat().st_size
    if how == "delete":
        path.unlink()
        return {"how": how}
    if how == "truncate":
        keep = rng.randrange(size) if size else 0
        with open(path, "r+b") as f:
            f.truncate(keep)
        return {"how": how, "from": size, "to": keep}
    data = bytearray(path.read_bytes())
    offsets = sorted(rng.randrange(size) for _ in range(rng.randint(1, 8)))
    for offset in offsets:
        data[offset] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return {"how": how, "offsets": offsets}


def drill_corrupt_checkpoint(ctx: Drills, trial: Trial) -> None:
    ref = ctx.reference("single")
    run_dir = trial.dir / "run"
    shutil.copytree(ref.dir, run_dir)
    (run_dir / "exit_status.json").unlink()
    root = run_dir / "checkpoints"
    # cut the finished run back to a random newest checkpoint, as a kill right after it leaves it
    newest = trial.rng.choice(range(4, STEPS + 1, 2))
    for path in files.step_dirs(root):
        if files.parse_step(path.name) > newest:
            shutil.rmtree(path)
    (root / files.LATEST).write_text(files.step_dir_name(newest))
    victim_dir = root / files.step_dir_name(newest)
    victim = trial.rng.choice(files.list_files(victim_dir))
    how = trial.pick("how", ["truncate", "flip", "delete"])
    trial.params.update(
        newest=newest, file=victim, **damage_file(trial.rng, victim_dir / victim, how)
    )
    run = ctx.launch(run_dir, [])
    code, _ = run.finish(ctx.timeout)
    out = run.output
    skipped = f"checkpoint {victim_dir} is unusable and was skipped" in out
    resumed = re.findall(r"resumed from step (\d+)", out)
    trial.params["resumed_from"] = int(resumed[0]) if resumed else None
    if skipped:
        trial.outcome = "detected, fell back to the previous checkpoint"
        trial.check(resumed == [str(newest - 2)], f"resumed from {resumed}, not {newest - 2}")
    else:  # only the manifest is not itself hashed: a flip in its timestamp changes nothing
        trial.outcome = "not detected"
        trial.check(victim == files.MANIFEST, f"damage to {victim} not detected")
    check_finished(trial, code, run.output, run_dir, ref)
    if trial.problems:
        trial.logs["resume"] = out[-4000:]


def prepare_small_dataset(out: Path) -> Path:
    """~140 windows of 64 byte tokens in shards of 12, from seeded word salad."""
    from data_pipeline.prepare import PrepareConfig, prepare_dataset

    rng = random.Random(20261201)
    words = "drill shard token window signal restart resume manifest rank step loss".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(110)]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.parent / "docs.txt"
    text.write_text("\n".join(f"doc {i}: {d}" for i, d in enumerate(docs)) + "\n")
    config = PrepareConfig(
        inputs=[str(text)], output=str(out), text_unit="line", seq_len=64,
        samples_per_shard=12, progress=False,
    )  # fmt: skip
    prepare_dataset(config)
    return out


def dataset_rows(root: Path, seq_len: int) -> dict[tuple[int, ...], tuple[int, int]]:
    """Each stored window as the input row it becomes (padded with 0) -> (shard, sample)."""
    import numpy as np

    from data_pipeline.shards import Manifest, ShardReader

    man = Manifest.load(root)
    dtype = np.dtype("<u2" if man.dtype == "uint16" else "<u4")
    rows = {}
    for shard, info in enumerate(man.splits["train"]):
        reader = ShardReader(root, info, dtype, seq_len)
        reader.open(verify_sha256=True)
        for i in range(info.samples):
            ids = reader.read(i)[0][:seq_len].tolist()
            rows[tuple(ids + [0] * (seq_len - len(ids)))] = (shard, i)
        reader.close()
    return rows


SHARD_STEPS = 10


def shard_overrides(data: Path, on_corrupt: str, verify: bool) -> list[str]:
    return [
        "model.vocab_size=272",
        f"data.sources=[{{path: {data}}}]",
        f"data.on_corrupt={on_corrupt}",
        f"data.verify_sha256={str(verify).lower()}",
        "data.max_skipped_fraction=0.5",  # a whole bad shard is ~9% of this small set
        f"train.steps={SHARD_STEPS}",
        "checkpoint.every=5",
    ]


def stream_rows(data: Path, overrides: list[str]) -> tuple[list[tuple[int, ...]], int]:
    """The rows the trainer's first stage reads under ``overrides`` (rebuilt here with the
    trainer's own reader settings: the order is a pure function of files, config and position),
    and how many samples the reader skipped meanwhile."""
    from data_pipeline.reader import build_reader
    from pretrain.config import load_config
    from pretrain.data_config import reader_config

    cfg = load_config(TINY, [*BASE, *LAYOUTS["single"], *overrides])
    tc = cfg.train
    rcfg = reader_config(
        cfg.data, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed,
        vocab_size=cfg.model.vocab_size,
    )  # fmt: skip
    rows: list[tuple[int, ...]] = []
    with warnings.catch_warnings():  # the trainer's output names the bad shard, checked there
        warnings.simplefilter("ignore", RuntimeWarning)
        reader = build_reader(rcfg, 0, 1)
        for _, batch in zip(range(tc.steps), reader):  # range first: no batch read past the end
            rows += [tuple(r) for r in batch["input_ids"].tolist()]
    return rows, reader.skipped


def damage_shard(rng: random.Random, data: Path, how: str, shard: int, sample: int) -> str:
    """Damage shard ``shard`` of ``data``; ``flip_sample`` hits a byte of sample ``sample``'s
    tokens. Returns the tar's path."""
    import tarfile

    from data_pipeline.shards import Manifest

    tar = data / Manifest.load(data).splits["train"][shard].path
    if how == "delete":
        tar.unlink()
    elif how == "truncate":  # inside the samples: a cut in the tar's end padding loses nothing
        end = int.from_bytes(tar.with_suffix(".idx").read_bytes()[-8:], "little")
        with open(tar, "r+b") as f:
            f.truncate(rng.randrange(end))
    else:
        raw = bytearray(tar.read_bytes())
        if how == "flip_sample":
            with tarfile.open(tar) as tf:
                member = [m for m in tf if ".tokens." in m.name][sample]
            offset = member.offset_data + rng.randrange(member.size)
        else:  # flip_any: anywhere in the tar, found by data.verify_sha256
            offset = rng.randrange(len(raw))
        raw[offset] ^= rng.randint(1, 255)
        tar.write_bytes(bytes(raw))
    return str(tar)


def drill_corrupt_shard(ctx: Drills, trial: Trial) -> None:
    clean = ctx.dataset()
    windows = dataset_rows(clean, 64)
    how = trial.pick("how", ["truncate", "flip_sample", "flip_any", "delete"])
    verify = how == "flip_any"
    # a shard (and sample) the run meets: one of the rows the clean stream reads
    met = sorted(
        {windows[row] for row in stream_rows(clean, shard_overrides(clean, "skip", verify))[0]}
    )
    shard, sample = trial.rng.choice(met)
    trial.params.update(how=how, shard=shard, sample=sample, verify_sha256=verify)
    lost = {
        (s, i)
        for (s, i) in windows.values()
        if s == shard and (how != "flip_sample" or i == sample)
    }
    results = {}
    damage_seed = trial.rng.random()  # the same damage for both modes
    for mode in ("skip", "error"):
        data = trial.dir / f"data-{mode}"
        shutil.copytree(clean, data)
        tar = damage_shard(random.Random(damage_seed), data, how, shard, sample)
        run_dir = trial.dir / f"run-{mode}"
        run = ctx.launch(run_dir, shard_overrides(data, mode, verify))
        code, _ = run.finish(ctx.timeout)
        results[mode] = (code, run.output, run_dir, data, tar)
    code, out, run_dir, data, tar = results["skip"]
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    skipped = rows[-1].get("data/skipped_samples", 0) if rows else 0
    trial.params["skipped_samples"] = skipped
    if not trial.check(
        code == 0 and len(rows) == SHARD_STEPS, f"skip: exit {code}, {len(rows)} steps"
    ):
        trial.logs["skip"] = out[-3000:]
    trial.check(skipped > 0, "skip: data/skipped_samples is 0")
    trial.check(tar in out, "skip: no warning names the shard")
    seen, replayed_skips = stream_rows(data, shard_overrides(data, "skip", verify))
    trial.check(
        replayed_skips == skipped, f"rebuilt stream skipped {replayed_skips}, trainer {skipped}"
    )
    twice = [r for r, n in Counter(seen).items() if n > 1]
    trial.check(not twice, f"skip: {len(twice)} rows read more than once")
    bad = [r for r in seen if r not in windows or windows[r] in lost]
    trial.check(not bad, f"skip: {len(bad)} rows are not good windows of the dataset")
    code, out, run_dir, _, tar = results["error"]
    status = read_exit_status(run_dir) or {}
    trial.params.update(error_exit_code=code, error_exit_status=status.get("status"))
    trial.params["error_traceback"] = "Traceback (most recent call last)" in out
    trial.params["error_lines"] = error_lines(out)
    if not trial.check(
        code not in (0, None) and tar in out, f"error: exit {code}, shard named: {tar in out}"
    ):
        trial.logs["error"] = out[-3000:]
    trial.outcome = f"{how}: skipped and counted; error exit {code}"


def error_lines(output: str) -> list[str]:
    """The distinct ``SomeError: message`` lines of the tracebacks in ``output``, in order."""
    found = re.findall(r"^[\w.]*(?:Error|Exception)\b.*$", output, flags=re.M)
    return list(dict.fromkeys(line[:240] for line in found))


def tmpfs_problem(probe: Path) -> str | None:
    """None when this process may mount a tmpfs (tried once), else why not."""
    probe.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        return f"not permitted: mount -t tmpfs: {(proc.stderr or proc.stdout).strip()[:200]}"
    subprocess.run(["umount", str(probe)], check=False)
    return None


def drill_disk_full(ctx: Drills, trial: Trial) -> None:
    if problem := tmpfs_problem(trial.dir / "probe"):
        trial.skipped = problem
        return
    ref = ctx.reference("single")
    size = trial.params["tmpfs_bytes"] = trial.rng.randrange(16, 3073) * 4096  # 64 KiB-12 MiB
    mount = trial.dir / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        run_dir = mount / "run"
        first = ctx.launch(run_dir, ["checkpoint.keep_last=2"])  # 3 checkpoints do not fit
        code, _ = first.finish(ctx.timeout)
        out = first.output
        status = read_exit_status(run_dir) or {}
        ckpts = [files.parse_step(p.name) for p in files.step_dirs(run_dir / "checkpoints")]
        trial.params.update(first_exit_code=code, exit_status=status.get("status"), kept=ckpts)
        errors = trial.params["errors"] = error_lines(out)
        failed = status.get("status") == "failed"
        saving = [e for e in errors if "CheckpointError" in e]
        cause = status.get("error", "") if failed else (saving or errors or [""])[-1]
        trial.check(code != 0, "filled the disk and exited 0")
        # what a requeue script and an operator read: the status, and the error it names
        trial.check(
            failed, f"exit_status.json still says {status.get('status')!r} after the failure"
        )
        trial.check(
            "No space left on device" in cause,
            f"the error does not say the disk is full: {cause[:160]!r}",
        )
        for problem in checkpoint_problems(run_dir):
            trial.check(False, f"after ENOSPC: {problem}")
        trial.outcome = f"disk full with {len(ckpts)} complete checkpoint(s) kept"
        subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
        second = ctx.launch(run_dir, ["checkpoint.keep_last=2"])
        code, _ = second.finish(ctx.timeout)
        check_finished(trial, code, second.output, run_dir, ref)
        if trial.problems:
            trial.logs["full"] = out[-3000:]
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


SILENT_SERVER = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(64)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "held = []\n"
    "while True: held.append(s.accept()[0])  # accept, never answer\n"
)
LOCK_HOLDER = (
    "import sqlite3, sys\n"
    "db = sqlite3.connect(sys.argv[1], timeout=120, isolation_level=None)\n"
    "db.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)
TRACKED = ["tracking.enabled=true", "tracking.system_metrics=false", "tracking.run_id_wait_s=1"]


def start_helper(code: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A helper process (fake server, lock holder); returns it and its first output line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    return proc, proc.stdout.readline().strip()


def stop_helper(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def drill_mlflow_outage(ctx: Drills, trial: Trial) -> None:
    ref = ctx.reference("single")
    kind = trial.pick("kind", ["refused", "silent", "locked"])
    run_dir = trial.dir / "run"
    helper, overrides = None, list(TRACKED)
    start = trial.rng.randint(1, STEPS - 1)
    stop = trial.rng.choice([None, trial.rng.randint(start + 1, STEPS)])
    if kind == "silent":
        trial.params["killed_after_step"] = stop
    elif kind == "locked":
        trial.params.update(locked_after_step=start, released_after_step=stop)
    try:
        if kind == "refused":
            overrides.append(f"tracking.uri=http://127.0.0.1:{free_port()}")
        elif kind == "silent":
            helper, port = start_helper(SILENT_SERVER)
            overrides.append(f"tracking.uri=http://127.0.0.1:{port}")
        run = ctx.launch(run_dir, overrides)
        if kind == "locked" and run.wait_step(start, ctx.timeout):
            helper, _ = start_helper(LOCK_HOLDER, str(run_dir / "mlflow.db"))
        if kind != "refused" and stop and run.wait_step(stop, ctx.timeout):
            stop_helper(helper)  # the server dies (refused from then on) or the lock goes
        code, _ = run.finish(ctx.timeout)
    finally:
        stop_helper(helper)
    out = run.output
    unsent = re.search(r"MLflow unsent at close: (\d+) metric points", out)
    trial.params["unsent_points"] = int(unsent[1]) if unsent else 0
    check_finished(trial, code, run.output, run_dir, ref)
    if kind != "locked":
        trial.check(bool(unsent) and int(unsent[1]) > 0, "no close warning counts unsent points")
    if unsent:
        trial.check(
            str(run_dir / "metrics.jsonl") in out, "the close warning names no metrics.jsonl"
        )
    trial.outcome = f"{kind}: " + ("unsent points named at close" if unsent else "all sent")
    if kind == "locked":  # the store is back: a rerun sends what it lacks, once
        again = ctx.launch(run_dir, TRACKED)
        trial.check(again.finish(ctx.timeout)[0] == 0, "rerun after the outage failed")
        check_store(trial, run_dir)
    if trial.problems:
        trial.logs["run"] = out[-4000:]


def check_store(trial: Trial, run_dir: Path) -> None:
    """One MLflow run in the run's SQLite store, holding every logged loss once, as logged."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if not trial.check(len(runs) == 1, f"{len(runs)} MLflow runs in the store"):
        return
    points = sorted(
        (m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "loss")
    )
    steps, losses = logged_steps(run_dir)
    trial.check(points == list(zip(steps, losses)), f"MLflow loss history {[s for s, _ in points]}")


DRILLS: dict[str, Callable[[Drills, Trial], None]] = {
    "sigterm": drill_sigterm,
    "sigterm_torchrun": drill_sigterm_torchrun,
    "kill9_restart": drill_kill9_restart,
    "corrupt_checkpoint": drill_corrupt_checkpoint,
    "corrupt_shard": drill_corrupt_shard,
    "disk_full": drill_disk_full,
    "mlflow_outage": drill_mlflow_outage,
}
QUICK = ("sigterm", "corrupt_checkpoint", "corrupt_shard")


# ----------------------------------------------------------------------------- report


def summarise(name: str, trials: list[Trial]) -> dict[str, Any]:
    """One table row: counts, and the notes (outcome classes, skips, the failures)."""
    passed = sum(t.passed for t in trials)
    skipped = [t for t in trials if t.skipped]
    failed = len(trials) - passed - len(skipped)
    notes = [f"{what} x{n}" for what, n in Counter(t.outcome for t in trials if t.outcome).items()]
    if skipped:
        notes.insert(0, f"{len(skipped)} skipped: {skipped[0].skipped}")
    failures: dict[str, list[int]] = {}
    for t in trials:
        for problem in t.problems:
            failures.setdefault(problem[:200], []).append(t.index)
    for problem, where in failures.items():
        notes.append(f"FAILED in trial(s) {', '.join(map(str, where))}: {problem}")
    return {
        "drill": name,
        "trials": len(trials),
        "passed": passed,
        "failed": failed,
        "skipped": len(skipped),
        "notes": "; ".join(notes),
        "wall_s": round(sum(t.wall_s for t in trials), 1),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| drill | trials | passed | failed | notes |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        notes = r["notes"].replace("|", "/")
        lines.append(f"| {r['drill']} | {r['trials']} | {r['passed']} | {r['failed']} | {notes} |")
    return "\n".join(lines)


def run_trial(ctx: Drills, name: str, index: int, seed: str, work: Path) -> Trial:
    trial = Trial(drill=name, index=index, seed=seed, dir=work / name / str(index))
    trial.dir.mkdir(parents=True)
    start = time.monotonic()
    try:
        DRILLS[name](ctx, trial)
    except Exception as err:  # noqa: BLE001 - a drill that breaks is a failed trial, not a stop
        trial.problems.append(f"drill raised {type(err).__name__}: {str(err)[:2000]}")
    trial.wall_s = time.monotonic() - start
    return trial


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5, help="trials of each drill")
    p.add_argument("--quick", action="store_true", help=f"1 trial of {', '.join(QUICK)}")
    p.add_argument("--only", action="append", choices=list(DRILLS), help="this drill (repeatable)")
    p.add_argument("--seed", default=None, help="seed of every random choice (default: drawn)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one process may take")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "drills.json"))
    p.add_argument("--work-dir", default=None, help="keep the run directories here")
    args = p.parse_args(argv)
    if args.quick:
        args.trials = 1
        args.only = args.only or list(QUICK)
    if args.trials < 1:
        p.error("--trials must be >= 1")
    args.seed = args.seed or str(random.SystemRandom().randrange(10**6))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = args.only or list(DRILLS)
    load_before = os.getloadavg()
    started = time.monotonic()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="drills-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Drills(work, args.timeout)
    trials: dict[str, list[Trial]] = {name: [] for name in names}
    try:
        with tqdm(total=len(names) * args.trials, desc="drills", unit="trial") as bar:
            for name in names:
                for index in range(args.trials):
                    bar.set_postfix_str(name)
                    trials[name].append(run_trial(ctx, name, index, args.seed, work))
                    bar.update()
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    rows = [summarise(name, trials[name]) for name in names]
    table = markdown_table(rows)
    print(table)
    result = {
        "settings": {
            "seed": args.seed,
            "trials": args.trials,
            "work_dir": args.work_dir,
            "drills": names,
            "config": TINY,
            "overrides": BASE,
            "layouts": LAYOUTS,
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "wall_s": round(time.monotonic() - started, 1),
        "table": rows,
        "trials": [t.record() for name in names for t in trials[name]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')} (seed {args.seed})")
    return result


if __name__ == "__main__":
    main()

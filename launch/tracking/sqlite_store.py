"""The local SQLite store: created whole or not at all, repaired after a killed creation, and
pointed at the run directory's artifacts again after the directory moved.

MLflow creates its schema in place, in about 2 s of migrations that are not all transactional. A
start killed in those seconds left a half-migrated ``mlflow.db`` that every later start failed on
("Detected out-of-date database schema", "index ... already exists"), so the run directory was
never tracked again. Here a new store is migrated in a temporary file and renamed into place, and
a store that cannot be opened and holds no run is moved aside (kept, not deleted) and created
again. A store that holds runs is never moved: its error is the caller's to report.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path

from launch.tracking.mlflow_tracker import first_line

logger = logging.getLogger("launch.tracking")

STORE_FILE = "mlflow.db"  # the default store, in the run directory
ARTIFACTS_DIR = "mlartifacts"  # the default artifact root, in the run directory
_CREATING = ".creating-"  # <db>.creating-<pid>-<id>: a store being created, linked when complete
_BROKEN = ".broken-"  # <db>.broken-<time>: a store moved aside
_SIDE_FILES = ("-journal", "-wal", "-shm")  # SQLite's, named after the database file
_CORE_TABLES = frozenset({"alembic_version", "experiments", "runs", "metrics"})


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store or an in-memory one."""
    if not uri.lower().startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def prepare_sqlite_store(uri: str, artifact_root: str) -> None:
    """Make the store at ``uri`` one that opens, before anything is logged to it.

    Args:
        uri: ``sqlite:///<path>``, exactly as the tracking client will use it.
        artifact_root: the artifact root (a ``file://`` URI) of the Default experiment of a store
            created here.

    Raises:
        Whatever MLflow raises for a store that holds runs but cannot be opened (an older schema
        wants ``mlflow db upgrade``); the file is left as it is.
    """
    db = sqlite_path(uri)
    if db is None:
        raise ValueError(f"not a sqlite:/// tracking URI: {uri!r}")
    db.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_creations(db)
    if db.exists():
        problem = _open_problem(db, uri, artifact_root)
        if problem is None:
            return
        aside = _move_aside(db)
        logger.warning(
            "MLflow store %s holds no run and cannot be used (%s), as a start killed while"
            " creating it leaves it: moved to %s, creating a new one",
            db,
            problem,
            aside,
        )
    _create(db, artifact_root)


def relocate_artifacts(db: Path, run_dir: Path) -> int:
    """Point the artifact locations in the run directory's own store at its ``mlartifacts``.

    The store keeps absolute ``file://`` locations; after the run directory moved they name the
    old place, and uploads would go there (recreating it). Every location of the form
    ``file://<elsewhere>/mlartifacts[/...]`` is rewritten to this run directory; others (set by
    hand) are left. One transaction: a kill leaves all old or all new.

    Returns:
        How many experiments and runs were re-pointed.
    """
    root = (run_dir.resolve() / ARTIFACTS_DIR).as_uri()
    changed = 0
    with closing(_connect(db)) as conn, conn:
        rows = conn.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        for exp_id, location in rows:
            if (new := _relocated(location, root)) is not None:
                conn.execute(
                    "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                    (new, exp_id),
                )
                changed += 1
        for run_id, location in conn.execute("SELECT run_uuid, artifact_uri FROM runs").fetchall():
            if (new := _relocated(location, root)) is not None:
                conn.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?", (new, run_id))
                conn.execute(
                    "UPDATE tags SET value = ? WHERE run_uuid = ? AND key = 'run_dir'",
                    (str(run_dir.resolve()), run_id),
                )
                changed += 1
    if changed:
        logger.info("MLflow store %s: artifact locations moved to %s", db, root)
    return changed


def _relocated(location: str | None, root: str) -> str | None:
    """``location`` under ``root`` instead of another ``.../mlartifacts``; None if it stays."""
    if not location or not location.startswith("file:"):
        return None
    head, sep, tail = location.rpartition(f"/{ARTIFACTS_DIR}")
    if not sep or (tail and not tail.startswith("/")) or head + sep == root:
        return None
    return root + tail


def _open_problem(db: Path, uri: str, artifact_root: str) -> str | None:
    """None when ``db`` opens as an MLflow store; else, for a store without runs, why not."""
    holds_runs = _holds_runs(db)
    # MLflow would migrate a schema with tables missing in place, the very thing that can break
    if not holds_runs and not _CORE_TABLES <= _tables(db):
        return "schema incomplete"
    try:
        _open(uri, artifact_root)
    except Exception as exc:
        if holds_runs:
            raise
        _forget_engine(uri)  # its pooled connections still point at the file moved aside
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


def _holds_runs(db: Path) -> bool:
    """Whether ``db`` holds a run; False for an empty, half-created or unreadable file."""
    try:
        with closing(_connect(db)) as conn:
            return conn.execute("SELECT 1 FROM runs LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise  # locked, unreadable directory: not evidence that it is empty
    except sqlite3.DatabaseError:  # not a database, or a malformed one
        return False


def _tables(db: Path) -> set[str]:
    try:
        with closing(_connect(db)) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError:
        return set()
    return {name for (name,) in rows}


def _connect(db: Path) -> sqlite3.Connection:
    # read-write (of an existing file), as MLflow opens it: a read-only connection cannot roll
    # back the journal a kill mid-transaction leaves, and would fail where MLflow recovers
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=30)


def _open(uri: str, artifact_root: str):  # noqa: ANN202 - an mlflow SqlAlchemyStore
    """Open (and for a new file, create) the store the way the tracking client will."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return SqlAlchemyStore(uri, artifact_root)


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached engine of ``uri``, closing its pooled connections."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engines = getattr(SqlAlchemyStore, "_engine_map", None)
    engine = engines.pop(uri, None) if isinstance(engines, dict) else None
    if engine is not None:
        engine.dispose()


def _create(db: Path, artifact_root: str) -> None:
    """Migrate a new store in a temporary file, then move it to ``db`` whole."""
    tmp = db.with_name(f"{db.name}{_CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp_uri = f"sqlite:///{tmp.resolve().as_posix()}"
    t0 = time.monotonic()
    try:
        _open(tmp_uri, artifact_root)
    finally:
        _forget_engine(tmp_uri)
    if _publish(tmp, db):
        logger.info("MLflow store %s created (%.1f s)", db, time.monotonic() - t0)


def _publish(tmp: Path, db: Path) -> bool:
    """Move the complete store ``tmp`` to ``db``, unless another process (a run sharing the
    store) put one there meanwhile: that one may already hold its run, so it is never replaced."""
    try:
        os.link(tmp, db)  # fails if db exists, unlike a rename
    except FileExistsError:
        tmp.unlink()
        return False
    except OSError:  # a filesystem without hard links
        if db.exists():
            tmp.unlink()
            return False
        os.replace(tmp, db)
    else:
        tmp.unlink()
    _fsync_dir(db.parent)
    return True


def _remove_killed_creations(db: Path) -> None:
    """Delete the temporary stores (and journals) of creations whose process is gone."""
    for tmp in db.parent.glob(f"{db.name}{_CREATING}*"):
        pid = tmp.name[len(db.name) + len(_CREATING) :].split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _move_aside(db: Path) -> Path:
    aside = db.with_name(f"{db.name}{_BROKEN}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(db, aside)
    for suffix in _SIDE_FILES:  # a journal left here would be applied to the new store
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A real PostgreSQL server for the tests: a temporary cluster on 127.0.0.1 and a free port.

Debian's ``postgresql`` package provides the binaries (``make postgres`` installs it; ``make test``
depends on it). The cluster is created with ``initdb`` (as the ``postgres`` user when the tests run as
root: the server refuses to run as root), with password authentication, and is stopped with
``pg_ctl stop`` — or, if that fails, by signalling its postmaster — and deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reid_pipeline_tests.ui_server import free_port

USER = "dagster"
DATABASE = "dagster"


def postgres_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (Debian's layout), else the ``initdb`` on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: float(p.parts[-3]))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `make postgres` (make test does)")


@dataclass
class PostgresServer:
    """One temporary cluster; ``start()`` then ``stop()`` (idempotent)."""

    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: os.urandom(12).hex())
    root: Path | None = None
    bindir: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def env(self) -> dict[str, str]:
        """The connection variables deploy/postgres/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": USER,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": DATABASE,
        }

    def _as_owner(self, argv: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root: root hands the cluster to the `postgres` user.
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self, timeout: float = 60) -> None:
        self.bindir = postgres_bindir()
        # Under /tmp (not pytest's root-only tmp folders) so that the `postgres` user can reach it.
        self.root = Path(tempfile.mkdtemp(prefix="reid-postgres-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        proc = subprocess.run(self._as_owner([
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", USER, "-A", "scram-sha-256",
            f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"]),
            capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            pytest.fail(f"initdb failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        # TCP on loopback only; the Unix socket in the cluster's own folder (not /var/run/postgresql).
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        proc = subprocess.run(self._as_owner([
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options,
            "-w", "-t", str(int(timeout)), "start"]),
            capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            self.stop()
            pytest.fail(f"pg_ctl start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")
        with self.connect("postgres") as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE}")

    def connect(self, database: str = DATABASE):
        import psycopg2  # dagster-postgres' driver, imported when a server is used

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=database)
        return _Closing(conn)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError, PermissionError):
            return None

    def stop(self) -> None:
        if self.root is None:
            return
        root, pid = self.root, self.postmaster_pid()
        if pid is not None:
            subprocess.run(self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                                           "-t", "30", "stop"]), capture_output=True, timeout=60, check=False)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):  # pg_ctl could not stop it: end the postmaster (its children follow)
                os.kill(pid, signal.SIGKILL)
        self.root = None
        shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Closing:
    """``with server.connect() as conn``: commit on success, and always close (psycopg2's own
    context manager only ends the transaction)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.conn.commit()
        finally:
            self.conn.close()

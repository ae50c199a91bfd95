"""Real services for the tests, started and stopped by the tests themselves, on 127.0.0.1 only:
a throwaway PostgreSQL cluster (Debian's `postgresql` package, installed by `.ci/run`), and the
Dagster webserver and daemon over a home made by `vnp_assets.instance.prepare_home`.

Everything started here is stopped at the end of its fixture, failed test or not: each service is
its own process group (a new session), killed as a group, and its descendants, found through
/proc before the kill, are killed too (a step process could have left the group).

Use the fixtures by importing them into a test module: `from services import postgres_url  # noqa: F401`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the virtual environment running the tests: dagster-webserver, dagster-daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Processes


# Starts a command with SIGINT and SIGTERM at their defaults: a process started from a non-interactive
# shell's background job inherits them ignored, and then neither Ctrl-C nor a plain kill would stop it.
_DEFAULT_SIGNALS = ("import os, signal, sys\n"
                    "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT): signal.signal(sig, signal.SIG_DFL)\n"
                    "os.execvp(sys.argv[1], sys.argv[1:])")


def with_default_signals(command: list[str]) -> list[str]:
    return [sys.executable, "-c", _DEFAULT_SIGNALS, *command]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (children before their own children)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_process_groups(processes: list[subprocess.Popen], *, grace_s: float = 10.0) -> None:
    """SIGTERM to the process group of each of `processes` (started with `start_new_session=True`) and to
    every descendant, SIGKILL to whatever still lives after `grace_s`; returns when all of them are gone."""
    pids = {pid for process in processes for pid in (process.pid, *descendants(process.pid))}
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for process in processes:
            with _suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        for pid in pids:
            with _suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for process in processes:
                process.poll()  # reaps our own children
            if not any(alive(pid) for pid in pids):
                return
            time.sleep(0.1)
            pids |= {pid for process in processes for pid in descendants(process.pid)}
    if leftovers := sorted(pid for pid in pids if alive(pid)):
        raise RuntimeError(f"processes {leftovers} survived SIGKILL")


@contextmanager
def _suppress(*errors: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except errors:
        pass


# ----------------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class PostgresServer:
    port: int
    data_dir: Path
    user: str  # the superuser (trust authentication on 127.0.0.1)

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Runs `sql` (one statement) and returns its rows, tab-separated."""
        return subprocess.run(
            [str(postgres_bin() / "psql"), "-X", "-q", "-A", "-t", "-F", "\t", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True, timeout=60).stdout


def postgres_bin() -> Path:
    """The newest PostgreSQL server's binaries (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(Path(path).parts[-3]))
    if not found:
        pytest.fail("PostgreSQL is not installed: `apt-get install -y postgresql` (.ci/run does it)", pytrace=False)
    return Path(found[-1]).parent


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run `command` as the `postgres` system user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A new cluster in a temporary folder, listening on 127.0.0.1 only (and a socket in that folder),
    stopped and deleted on exit."""
    bin_dir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="vnp-postgres-"))
    data_dir, port = root / "data", free_port()
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER") or "vnp"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    started = False
    try:
        subprocess.run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", user, "--auth=trust",
                                          "--encoding=UTF8", "--no-sync"]),
                       check=True, capture_output=True, text=True, timeout=120)
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        started = True
        subprocess.run(_as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(root / "server.log"),
                                          "-o", options, "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, text=True, timeout=90)
        yield PostgresServer(port, data_dir, user)
    except subprocess.CalledProcessError as error:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"{error.cmd!r} failed:\n{error.stdout}{error.stderr}{log}") from None
    finally:
        if started:
            subprocess.run(_as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w",
                                              "stop"]), capture_output=True, timeout=60)
            _kill_postmaster(data_dir)
        shutil.rmtree(root, ignore_errors=True)


def _kill_postmaster(data_dir: Path) -> None:
    """Whatever `pg_ctl stop` left (it should leave nothing): the postmaster of its pid file."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    with _suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the test session."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database of the session's cluster, dropped after the test."""
    name = f"vnp_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}_{time.monotonic_ns() % 10**6}"
    postgres.psql(f"CREATE DATABASE {name}")
    try:
        yield postgres.url(name)
    finally:
        postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# ----------------------------------------------------------------------------------------------
# Dagster webserver and daemon


@dataclass(frozen=True)
class DagsterServices:
    home: Path
    url: str  # the webserver, e.g. http://127.0.0.1:41234
    logs: Path  # webserver.log, daemon.log

    def graphql(self, query: str, **variables) -> dict:
        """The `data` of a GraphQL query to the webserver (the API the UI itself uses)."""
        request = urllib.request.Request(f"{self.url}/graphql", json.dumps({"query": query, "variables": variables}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for name in ("webserver.log", "daemon.log"):
            path = self.logs / name
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {path} (last {lines} lines)\n" + "\n".join(text))
        return "\n".join(out)


def wait_for_http(url: str, *, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url} answered:\n"
                               + (log.read_text(errors="replace")[-4000:] if log and log.exists() else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s:\n"
                               + (log.read_text(errors="replace")[-4000:] if log and log.exists() else ""))
        time.sleep(0.5)


@contextmanager
def dagster_services(home: Path, env: Mapping[str, str] | None = None, *,
                     workspace: Path = REPO / "workspace.yaml", start_timeout_s: float = 180.0) -> Iterator[DagsterServices]:
    """`dagster-webserver` and `dagster-daemon run` on the home `home` (prepared already), the webserver on
    127.0.0.1 at a free port; both stopped, with everything they started, on exit."""
    home = Path(home).resolve()
    port = free_port()
    environ = {**os.environ, **(env or {}), "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    environ["PATH"] = f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '')}"
    logs = home / "service_logs"  # not "logs": Dagster empties $DAGSTER_HOME/logs (telemetry uploads)
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        for name, command in (
            ("webserver", [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)]),
            ("daemon", [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(workspace)]),
        ):
            with open(logs / f"{name}.log", "wb") as log:
                processes.append(subprocess.Popen(with_default_signals(command), cwd=home, env=environ, stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/server_info", timeout_s=start_timeout_s, process=processes[0], log=logs / "webserver.log")
        yield DagsterServices(home, url, logs)
    finally:
        stop_process_groups(processes)

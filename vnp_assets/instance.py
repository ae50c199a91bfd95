"""The Dagster home (`DAGSTER_HOME`) of vnp: `prepare_home` is the one place that makes one.

A home is a folder with the instance settings `dagster.yaml`, written from the repository's
template (queued run coordinator, `gpu` pool at op granularity, telemetry off), the `inbox` the
sensor watches, and, with SQLite storage (the default), the run history itself. With a PostgreSQL
URL the history goes to that database instead (a `storage: postgres:` section, dagster-postgres).

`vnp run`, `make ui` and the tests prepare their homes here, so every home has its `gpu` pool sized
from the start: a run queued by `dagster dev` on a fresh home would otherwise find the pool unset.

    python -m vnp_assets.instance HOME [--postgres-url postgresql://USER[:PASSWORD]@HOST[:PORT]/DB] [--gpu-slots N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import yaml
from dagster import DagsterEventType, DagsterInstance

from vnp_core.errors import first_line

TEMPLATE = Path(__file__).resolve().parents[1] / "dagster.yaml"
GPU_POOL = "gpu"
# dagster-postgres installs psycopg2, while SQLAlchemy 2.1 maps a plain `postgresql://` to psycopg 3
# ("No module named 'psycopg'"): the driver is named explicitly.
PSYCOPG2_SCHEME = "postgresql+psycopg2"
_PLAIN_SCHEMES = {"postgres", "postgresql", PSYCOPG2_SCHEME}


class HomeError(ValueError):
    """A home that cannot be used as asked; the message says why and what to do."""


class HomeMismatchError(HomeError):
    """A home exists already with another storage than the one asked for."""


def postgres_storage(url: str) -> dict:
    """The `storage:` section of dagster.yaml for the PostgreSQL database at `url`
    (`postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?PARAM=VALUE...]`; `?host=/socket/dir` for a Unix socket)."""
    parts = urlsplit(url)
    if parts.scheme not in _PLAIN_SCHEMES:
        raise ValueError(f"{_redact(url)}: expected a postgresql:// URL (the psycopg2 driver is what dagster-postgres "
                         f"installs), not {parts.scheme}://")
    db_name = unquote(parts.path.lstrip("/"))
    if not parts.username or not db_name:
        raise ValueError(f"{_redact(url)}: a PostgreSQL URL names its user and database: "
                         "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB")
    try:
        port = parts.port or 5432
    except ValueError:
        raise ValueError(f"{_redact(url)}: the port is not a number") from None
    db = {"username": unquote(parts.username), "hostname": parts.hostname or "", "port": port, "db_name": db_name,
          "scheme": PSYCOPG2_SCHEME}
    if parts.password:
        db["password"] = unquote(parts.password)
    if params := dict(parse_qsl(parts.query)):
        db["params"] = params
    return {"postgres": {"postgres_db": db}}


def prepare_home(home: Path, *, postgres_url: str | None = None, gpu_slots: int) -> DagsterInstance:
    """The instance at `home`, made ready: `dagster.yaml` written (once), the inbox made, the `gpu`
    pool sized to `gpu_slots` if it was never sized. The caller closes the instance (`with ... as instance`).

    A home prepared before is left as it is. `postgres_url=None` takes the home's storage as it is
    (SQLite for a new home); a URL must match the storage of an existing home, or `HomeMismatchError` says what to do.
    """
    if gpu_slots < 1:
        raise ValueError(f"gpu_slots={gpu_slots}: the gpu pool needs at least one slot")
    home = Path(home).resolve()
    wanted = None if postgres_url is None else postgres_storage(postgres_url)
    config = home / "dagster.yaml"
    if config.exists():
        existing = _storage_of(config)
        if wanted is not None and existing != wanted:
            raise HomeMismatchError(
                f"{home} keeps its runs in {_describe(existing, home)}, not in {_describe(wanted, home)}: "
                f"use another home, or drop the PostgreSQL URL to use this one as it is "
                f"(to switch it, move {config} away first; its history stays where it is)")
    if postgres_url is not None:
        _check_postgres(postgres_url, home)
    created = not config.exists()
    if created:
        home.mkdir(parents=True, exist_ok=True)
        _write_config(config, wanted)
    instance = None
    try:
        instance = DagsterInstance.from_config(str(home))
        if GPU_POOL not in instance.event_log_storage.get_concurrency_keys():
            instance.event_log_storage.set_concurrency_slots(GPU_POOL, gpu_slots)
        if created:
            # Where the daemon's run-retry consumer starts reading (dagster's cursor keys): a new home
            # has no older run to retry, and without them its first start warns that it ignores them.
            instance.daemon_cursor_storage.set_cursor_values(
                {f"EVENT_LOG_CONSUMER_CURSOR-{event.value}": "0"
                 for event in (DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_SUCCESS)})
    except BaseException as error:
        where = _describe(_storage_of(config), home)
        if instance is not None:
            instance.dispose()
        if created:  # nothing half made: a later call with the right URL starts afresh
            config.unlink(missing_ok=True)
        if isinstance(error, Exception) and not isinstance(error, ValueError):
            raise HomeError(f"{home}: cannot open its run storage ({where}): {first_line(error)}") from error
        raise
    (home / "inbox").mkdir(exist_ok=True)
    return instance


def _check_postgres(url: str, home: Path) -> None:
    """One connection to the database, so that a wrong URL is one sentence (not Dagster's retries)."""
    import psycopg2

    try:
        psycopg2.connect(urlunsplit(urlsplit(url)._replace(scheme="postgresql")), connect_timeout=15).close()
    except psycopg2.Error as error:
        reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])
        raise HomeError(f"{home}: cannot connect to {_redact(url)}: {reason} (is the server running, does the database "
                        "exist (createdb), are the user and password right?)") from None


def default_gpu_slots(devices: list[int] | None = None) -> int:
    """One slot per GPU vnp may use (`devices`, default every GPU of the host), one on a CPU-only host."""
    from vnp_core.gpu import discover_devices

    return max(1, len(discover_devices(devices)))


def _write_config(config: Path, storage: dict | None) -> None:
    text = TEMPLATE.read_text()
    if storage is not None:
        text += ("\n# PostgreSQL (written by vnp_assets/instance.py); the psycopg2 driver is named by `scheme`.\n"
                 + yaml.safe_dump({"storage": storage}, sort_keys=False))
    tmp = config.with_name(config.name + ".tmp")
    # A password may be in it: readable by its owner only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if storage is not None else 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(config)


def _storage_of(config: Path) -> dict | None:
    try:
        settings = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as error:
        raise HomeError(f"{config}: not valid YAML ({error}); fix or remove it") from None
    if not isinstance(settings, dict):
        raise HomeError(f"{config}: expected a mapping of instance settings; fix or remove it")
    return settings.get("storage")


def _describe(storage: dict | None, home: Path) -> str:
    if storage is None:
        return f"SQLite under {home}"
    postgres = storage.get("postgres") if isinstance(storage, dict) else None
    if isinstance(postgres, dict) and isinstance(db := postgres.get("postgres_db"), dict):
        return (f"PostgreSQL database {db.get('db_name')} as {db.get('username')} at "
                f"{db.get('hostname') or db.get('params', {}).get('host', 'the local socket')}:{db.get('port', 5432)}")
    if isinstance(postgres, dict) and "postgres_url" in postgres:
        return f"PostgreSQL at {_redact(str(postgres['postgres_url']))}"
    return f"the storage {yaml.safe_dump(storage, default_flow_style=True).strip()}"


def _redact(url: str) -> str:
    """`url` with its password, if any, as ***."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}").geturl()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vnp_assets.instance", description=__doc__.split("\n\n")[0])
    parser.add_argument("home", type=Path, help="the DAGSTER_HOME folder (made if missing)")
    parser.add_argument("--postgres-url", default=os.environ.get("VNP_POSTGRES_URL") or None,
                        help="keep runs in this PostgreSQL database (default: $VNP_POSTGRES_URL, else SQLite in HOME)")
    parser.add_argument("--gpu-slots", type=int, default=None,
                        help="size of the gpu pool of a new home (default: the GPUs that VNP_SETTINGS' devices allow, at least 1)")
    args = parser.parse_args(argv)
    try:
        slots = args.gpu_slots if args.gpu_slots is not None else default_gpu_slots(_devices_from_settings())
        with prepare_home(args.home, postgres_url=args.postgres_url, gpu_slots=slots) as instance:
            pool = instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count
            storage = _describe(_storage_of(args.home / "dagster.yaml"), args.home.resolve())
    except (ValueError, OSError) as error:  # HomeError included
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"DAGSTER_HOME {args.home.resolve()}: runs in {storage}; gpu pool: {pool} slot(s)")
    return 0


def _devices_from_settings() -> list[int] | None:
    """`devices` of the `VNP_SETTINGS` file, as the code location will read it."""
    if "VNP_SETTINGS" not in os.environ:
        return None
    settings = yaml.safe_load(Path(os.environ["VNP_SETTINGS"]).read_text()) or {}
    return settings.get("devices") if isinstance(settings, dict) else None


if __name__ == "__main__":
    sys.exit(main())

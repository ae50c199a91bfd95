"""The same end to end on SQLite and on a real PostgreSQL (Debian's `postgresql`, a throwaway cluster on
127.0.0.1 started by tests/services.py): instances made by `vnp_assets.instance.prepare_home`.

- The inbox-to-calls flow of tests/test_assets_flow.py (sensor, automation, every asset), which runs
  there on SQLite, collected here again with `instance` overridden by a PostgreSQL home.
- `vnp run` on a PostgreSQL home, its shard steps in worker processes: the runs, materializations and
  check results are in the database (read back through the instance and with psql), none in SQLite files.
- `prepare_home`: the psycopg2 driver named, idempotent, a different database refused with what to do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from services import PostgresServer, postgres, postgres_url  # noqa: F401  (fixtures)

from vnp_assets.instance import HomeError, HomeMismatchError, postgres_storage, prepare_home
from real_genomes import FLU

# The SQLite flow, collected again in this module, where `instance` below is PostgreSQL.
from test_assets_flow import (  # noqa: F401  (collected as a test of this module)
    test_a_dropped_fasta_flows_through_sensor_and_automation_to_predictions as test_the_inbox_flow_on_postgres,
)

REPO = Path(__file__).resolve().parents[1]
VNP = Path(sys.executable).parent / "vnp"
ASSETS = ["sequence_index", "esm2_embeddings", "dnabert_s_embeddings", "merged_embeddings", "fp16_validation_report",
          "virnucpro_predictions"]


@pytest.fixture
def instance(tmp_path: Path, postgres_url: str) -> Iterator[DagsterInstance]:
    """Overrides conftest's: an instance in a home made by `prepare_home` over a new PostgreSQL database."""
    with prepare_home(tmp_path / "dagster_home", postgres_url=postgres_url, gpu_slots=1) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        yield instance
    assert not list((tmp_path / "dagster_home").rglob("*.db")), "no SQLite storage beside PostgreSQL"


@pytest.mark.slow
def test_vnp_run_keeps_its_runs_materializations_and_checks_in_postgres(
        tmp_path: Path, postgres: PostgresServer, postgres_url: str) -> None:
    home = tmp_path / "home"
    prepare_home(home, postgres_url=postgres_url, gpu_slots=1).dispose()
    fasta = tmp_path / "flu.fasta"
    shutil.copyfile(FLU, fasta)

    done = subprocess.run([str(VNP), "run", str(fasta), "--home", str(home), "--shards", "2"],
                          capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout + done.stderr
    assert (home / "storage" / "samples" / "flu" / "predictions" / "prediction_results.txt").exists()
    assert not list(home.rglob("*.db")), "no SQLite storage beside PostgreSQL"
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        runs = instance.get_runs()
        assert runs and {run.status for run in runs} == {DagsterRunStatus.SUCCESS}
        assert instance.get_dynamic_partitions("samples") == ["flu"]
        for asset in ASSETS:
            assert instance.get_latest_materialization_event(AssetKey(asset)) is not None, asset
        evaluations = [entry.dagster_event.event_specific_data for run in runs
                       for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)]
        assert evaluations and all(evaluation.passed for evaluation in evaluations)
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1

    # The same, read from the database itself.
    database = postgres_url.rsplit("/", 1)[1]
    assert int(postgres.psql("SELECT count(*) FROM runs WHERE status = 'SUCCESS'", database)) == len(runs)
    materialized = postgres.psql(
        "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'", database)
    assert sorted(line for line in materialized.splitlines() if line) == sorted(f'["{asset}"]' for asset in ASSETS)
    assert int(postgres.psql("SELECT count(*) FROM asset_check_executions WHERE execution_status = 'SUCCEEDED'",
                             database)) == len(evaluations)


def test_prepare_home_names_the_psycopg2_driver_and_refuses_another_database(
        tmp_path: Path, postgres: PostgresServer, postgres_url: str) -> None:
    home = tmp_path / "home"
    with prepare_home(home, postgres_url=postgres_url, gpu_slots=3) as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
        assert instance.get_runs_count() == 0
    written = yaml.safe_load((home / "dagster.yaml").read_text())
    assert written["storage"] == postgres_storage(postgres_url)
    assert written["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert written["run_coordinator"]["class"] == "QueuedRunCoordinator" and written["telemetry"] == {"enabled": False}
    assert (home / "inbox").is_dir()

    # Prepared already: left as it is (the pool keeps its size), with or without the URL.
    for url in (postgres_url, None):
        with prepare_home(home, postgres_url=url, gpu_slots=1) as instance:
            assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    other = postgres_url.rsplit("/", 1)[0] + "/another_database"
    with pytest.raises(HomeMismatchError, match=r"keeps its runs in PostgreSQL database vnp_\w+ .*not in PostgreSQL "
                                                r"database another_database.*use another home"):
        prepare_home(home, postgres_url=other, gpu_slots=1)
    sqlite_home = tmp_path / "sqlite_home"
    prepare_home(sqlite_home, gpu_slots=1).dispose()
    assert (sqlite_home / "dagster.yaml").read_text() == (REPO / "dagster.yaml").read_text()
    with pytest.raises(HomeMismatchError, match="keeps its runs in SQLite under"):
        prepare_home(sqlite_home, postgres_url=postgres_url, gpu_slots=1)

    # A database that is not there: one sentence, and no home half made.
    with pytest.raises(HomeError, match=r'cannot connect to .*/no_such_db: .*database "no_such_db" does not exist'):
        prepare_home(tmp_path / "new_home", postgres_url=postgres.url("no_such_db"), gpu_slots=1)
    assert not (tmp_path / "new_home" / "dagster.yaml").exists()


def test_postgres_urls_become_psycopg2_settings() -> None:
    assert postgres_storage("postgresql://lab:s%40cret@db.example:6543/vnp?sslmode=require") == {"postgres": {"postgres_db": {
        "username": "lab", "hostname": "db.example", "port": 6543, "db_name": "vnp", "scheme": "postgresql+psycopg2",
        "password": "s@cret", "params": {"sslmode": "require"}}}}
    assert postgres_storage("postgres://lab@/vnp?host=/run/postgresql")["postgres"]["postgres_db"] == {
        "username": "lab", "hostname": "", "port": 5432, "db_name": "vnp", "scheme": "postgresql+psycopg2",
        "params": {"host": "/run/postgresql"}}
    for bad, why in [("mysql://lab@db/vnp", "expected a postgresql:// URL"),
                     ("postgresql+psycopg://lab@db/vnp", "expected a postgresql:// URL"),
                     ("postgresql://db.example/vnp", "names its user and database"),
                     ("postgresql://lab:pw@db.example/", "names its user and database"),
                     ("postgresql://lab:pw@db.example:port/vnp", "the port is not a number")]:
        with pytest.raises(ValueError, match=why) as error:
            postgres_storage(bad)
        assert ":pw@" not in str(error.value), "a password is never printed"

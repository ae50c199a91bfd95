"""The web UI as a user meets it, in headless Chromium (Debian's `chromium`, driven by playwright; no
browser is ever downloaded), against `dagster-webserver` and `dagster-daemon` on 127.0.0.1 over a
home made by `prepare_home`, with the tiny models on the CPU:

- the asset graph shows every asset;
- phiX174 dropped in the inbox reaches the calls by the sensor and declarative automation alone, after
  one of its shards (esm2, shard 1) failed and was rerun by a backfill launched from the UI's
  materialize dialog;
- the validation report's histogram is an image on the report's asset page;
- `make ui` serves the UI and stops, with everything it started, on Ctrl-C.

Everything is stopped at the end (tests/services.py); a failing test leaves a screenshot and the
services' logs in its pytest temporary folder and says where.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import DagsterServices, alive, dagster_services, descendants, free_port, wait_for_http, with_default_signals

from vnp_assets.instance import prepare_home
from real_genomes import PHIX

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install -e .[dev] brings playwright")
expect = playwright_sync.expect

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "phiX174"
ASSETS = ["sequence_index", "esm2_embeddings", "dnabert_s_embeddings", "merged_embeddings", "fp16_validation_report",
          "virnucpro_predictions"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# From the drop to the calls, a failed shard and its backfill included; VNP_UI_CALLS_WITHIN_S for a slow host.
CALLS_WITHIN_S = float(os.environ.get("VNP_UI_CALLS_WITHIN_S", 6 * 60))


@dataclass
class UiSession:
    services: DagsterServices
    home: Path
    obstacle: Path  # what makes esm2's shard 1 fail until it is removed
    dropped_at: float  # time.monotonic() of the drop

    def seconds_left(self) -> float:
        return CALLS_WITHIN_S - (time.monotonic() - self.dropped_at)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiSession]:
    """Webserver and daemon over a fresh home whose inbox holds phiX174 from the start (the sensor's first
    tick takes it), two shards, the `gpu` pool at two slots (both shards at once on the CPU), and an
    obstacle that fails esm2's shard 1: a non-empty folder where the shard's file is to be written."""
    if not PHIX.exists():
        pytest.skip(f"{PHIX}: the shared real-data folder is not here")
    home = tmp_path_factory.mktemp("ui_home")
    prepare_home(home, gpu_slots=2).dispose()
    settings = home / "vnp_settings.yaml"
    settings.write_text("inbox_settle_seconds: 0\nnum_shards: 2\n")
    obstacle = home / "storage" / "samples" / SAMPLE / "embeddings" / "esm2" / "shard-1.h5"
    obstacle.mkdir(parents=True)
    (obstacle / "in-the-way").write_text("a folder where the shard's file goes: esm2 shard 1 fails until it is removed\n")
    shutil.copyfile(PHIX, home / "inbox" / PHIX.name)
    dropped_at = time.monotonic()
    with dagster_services(home, {"VNP_SETTINGS": str(settings)}) as services:
        yield UiSession(services, home, obstacle, dropped_at)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)", pytrace=False)
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, ui: UiSession) -> Iterator[object]:
    """A page in a new browser context, wide enough for the whole asset graph at its default zoom."""
    context = browser.new_context(viewport={"width": 2560, "height": 1440})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()


@contextmanager
def screenshot_on_failure(page, ui: UiSession, tmp_path: Path) -> Iterator[None]:
    """On failure: a screenshot of the page and the services' logs in `tmp_path`, named in the error."""
    try:
        yield
    except Exception as error:
        shot = tmp_path / "failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception as screenshot_error:  # the page may be gone
            shot = Path(f"(no screenshot: {screenshot_error})")
        for log in ui.services.logs.glob("*.log"):
            shutil.copyfile(log, tmp_path / log.name)
        raise AssertionError(f"{error}\nscreenshot: {shot}; services' logs: {tmp_path}\n{ui.services.log_tail(20)}") from error


def wait_until(what: str, probe: Callable[[], object], *, timeout_s: float, every_s: float = 3.0) -> object:
    """`probe()` until it returns something true (returned); AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        if result := probe():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


# ----------------------------------------------------------------------------------------------
# What the UI shows, read through its own GraphQL API


RUNS = """query Runs($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) { ... on Runs { results { runId status tags { key value } } } }
}"""
MATERIALIZATIONS = """query Materializations($path: [String!]!, $partitions: [String!]) {
  assetOrError(assetKey: {path: $path}) { ... on Asset { assetMaterializations(partitions: $partitions) { partition runId } } }
}"""
BACKFILLS = """query Backfills {
  partitionBackfillsOrError { ... on PartitionBackfills { results { id status timestamp } } }
}"""


def shard_key(shard: int) -> str:
    return f"{SAMPLE}|{shard}"  # a sample x shard partition key, dimensions in name order


def runs_of_partition(services: DagsterServices, partition: str) -> list[dict]:
    return services.graphql(RUNS, tags=[{"key": "dagster/partition", "value": partition}])["runsOrError"]["results"]


def materializations(services: DagsterServices, asset: str, partition: str) -> list[dict]:
    asset_or_error = services.graphql(MATERIALIZATIONS, path=[asset], partitions=[partition])["assetOrError"]
    return asset_or_error.get("assetMaterializations") or []


def backfills(services: DagsterServices) -> list[dict]:
    return services.graphql(BACKFILLS)["partitionBackfillsOrError"]["results"]


def backfill_status(services: DagsterServices, backfill_id: str) -> str | None:
    """The backfill's status once it has ended, else None."""
    status = next(backfill["status"] for backfill in backfills(services) if backfill["id"] == backfill_id)
    return None if status in ("REQUESTED", "CANCELING", "FAILING") else status


def step_failures(services: DagsterServices, run_id: str) -> list[str]:
    """The error messages of a run's failed steps."""
    events = services.graphql("""query Failures($id: ID!) { runOrError(runId: $id) { ... on Run {
        eventConnection { events { ... on ExecutionStepFailureEvent { stepKey error { message } } } } } } }""",
                              id=run_id)["runOrError"]["eventConnection"]["events"]
    return [f"{event['stepKey']}: {event['error']['message'].strip()}" for event in events if event.get("error")]


def run_tags(services: DagsterServices, run_id: str) -> dict[str, str]:
    runs = services.graphql("""query Run($id: ID!) { runOrError(runId: $id) { ... on Run { tags { key value } } } }""",
                            id=run_id)
    return {tag["key"]: tag["value"] for tag in runs["runOrError"]["tags"]}


# ----------------------------------------------------------------------------------------------


def test_the_asset_graph_shows_every_asset(ui: UiSession, page, tmp_path: Path) -> None:
    with screenshot_on_failure(page, ui, tmp_path):
        page.goto(f"{ui.services.url}/asset-groups")
        # The graph opens with its groups collapsed: unfold each, as a user would.
        unfold = page.get_by_role("img", name="unfold_more")
        unfold.first.wait_for(timeout=90_000)
        while (groups := unfold.count()) > 0:
            unfold.first.click()
            page.wait_for_function(f"document.querySelectorAll('[aria-label=unfold_more]').length < {groups}")
        for asset in ASSETS:
            expect(page.get_by_text(asset, exact=True)).to_be_visible()


def test_a_dropped_fasta_reaches_the_calls_after_its_failed_shard_is_backfilled_from_the_ui(
        ui: UiSession, page, tmp_path: Path) -> None:
    services = ui.services
    with screenshot_on_failure(page, ui, tmp_path):
        # The sensor registered the drop and automation ran both shards; esm2's shard 1 failed on the obstacle.
        def shard_1_failed() -> bool:
            if materializations(services, "esm2_embeddings", shard_key(1)):
                raise AssertionError(f"esm2's shard 1 was made despite {ui.obstacle}: the test's failure did not happen")
            return any(run["status"] == "FAILURE" for run in runs_of_partition(services, shard_key(1)))

        wait_until("the run of shard 1 to fail on the obstacle", shard_1_failed, timeout_s=ui.seconds_left())
        assert materializations(services, "esm2_embeddings", shard_key(0)), "esm2's shard 0 should have been made"
        assert materializations(services, "dnabert_s_embeddings", shard_key(1)), \
            "dnabert_s's shard 1 should be kept when esm2's fails in the same step"
        assert not materializations(services, "esm2_embeddings", shard_key(1)), f"esm2 shard 1 made despite {ui.obstacle}"
        assert not materializations(services, "merged_embeddings", SAMPLE)

        shutil.rmtree(ui.obstacle)
        earlier_backfills = {backfill["id"] for backfill in backfills(services)}

        # The user's rerun: the sample's esm2 shards, backfilled from the asset's materialize dialog.
        page.goto(f"{services.url}/assets/esm2_embeddings")
        page.get_by_role("button", name="Materialize…").click()
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize esm2_embeddings")
        expect(dialog).to_be_visible()
        dialog.get_by_text("Select a partition or create one").first.click()  # the sample dimension
        popover = page.locator(".dagster-popover")
        popover.get_by_text(SAMPLE, exact=True).first.click()
        dialog.get_by_text("Launch runs to materialize").click()  # closes the partition list
        expect(popover).to_have_count(0)
        dialog.get_by_role("button", name="All").nth(1).click()  # every shard
        expect(dialog.get_by_text("2 partitions", exact=True)).to_be_visible()
        # One partition alone would be launched as a plain run: two make the dialog launch a backfill.
        dialog.get_by_role("button", name="Launch backfill").click()
        expect(dialog).to_have_count(0)

        backfill = wait_until("the backfill launched from the UI to appear",
                              lambda: [b for b in backfills(services) if b["id"] not in earlier_backfills],
                              timeout_s=60, every_s=1)[0]
        page.goto(f"{services.url}/runs/b/{backfill['id']}")
        def backfill_finished() -> str | None:
            for run in services.graphql(RUNS, tags=[{"key": "dagster/backfill", "value": backfill["id"]}])[
                    "runsOrError"]["results"]:
                if run["status"] == "FAILURE":
                    raise AssertionError(f"run {run['runId']} of backfill {backfill['id']} failed: "
                                         + "; ".join(step_failures(services, run["runId"])))
            return backfill_status(services, backfill["id"])

        status = wait_until(f"backfill {backfill['id']} to finish", backfill_finished, timeout_s=ui.seconds_left())
        assert status in ("COMPLETED", "COMPLETED_SUCCESS"), f"backfill {backfill['id']} ended {status}"
        made = materializations(services, "esm2_embeddings", shard_key(1))
        assert made, "the backfill did not make esm2's shard 1"
        assert run_tags(services, made[0]["runId"]).get("dagster/backfill") == backfill["id"]

        # Automation carries the sample on: merge, validation report, calls.
        calls = wait_until(f"virnucpro_predictions of {SAMPLE} (within {CALLS_WITHIN_S} s of the drop)",
                           lambda: materializations(services, "virnucpro_predictions", SAMPLE),
                           timeout_s=ui.seconds_left())
        assert calls[0]["partition"] == SAMPLE
        predictions = ui.home / "storage" / "samples" / SAMPLE / "predictions" / "prediction_results.txt"
        assert predictions.read_text().startswith("Sequence_ID\tPrediction\tscore1\tscore2\n")

        page.goto(f"{services.url}/assets/virnucpro_predictions?view=partitions")
        expect(page.get_by_text(SAMPLE, exact=True).first).to_be_visible()


def test_the_validation_report_shows_its_histogram(ui: UiSession, page, tmp_path: Path) -> None:
    services = ui.services
    with screenshot_on_failure(page, ui, tmp_path):
        wait_until(f"fp16_validation_report of {SAMPLE}", lambda: materializations(services, "fp16_validation_report", SAMPLE),
                   timeout_s=min(60.0, max(ui.seconds_left(), 0.0)))
        page.goto(f"{services.url}/assets/fp16_validation_report")
        expect(page.get_by_text("Metadata", exact=True).first).to_be_visible(timeout=60_000)
        # The histogram is an image in the metadata: shown on the page, not behind "[Show Markdown]".
        histogram = page.locator("img[src^='data:image/'], img[alt*='histogram' i]")
        expect(histogram.first).to_be_visible()
        assert histogram.first.evaluate("img => img.complete && img.naturalWidth > 0"), "the histogram image did not load"


def test_make_ui_serves_the_ui_with_no_warning_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`make ui HOST=127.0.0.1 PORT=<port>`: prepares the home (the gpu pool sized), serves, prints no
    warning, and a Ctrl-C (SIGINT to make's process group, as a terminal sends it) stops every process."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "dagster").exists():
        pytest.skip("run from the project's virtual environment (make test)")
    home, port = tmp_path / "home", free_port()
    log_path = tmp_path / "make_ui.log"
    environ = {key: value for key, value in os.environ.items() if key not in ("DAGSTER_HOME", "VNP_SETTINGS")}
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            with_default_signals(["make", "--no-print-directory", "-o", f"{venv}/.installed", "ui", f"VENV={venv}",
                                  f"HOME_DIR={home}", "HOST=127.0.0.1", f"PORT={port}"]),
            cwd=REPO, env=environ, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/server_info", timeout_s=180, process=make, log=log_path)
        time.sleep(5)  # the daemon's first ticks: what it prints on start belongs to the check below
        started = descendants(make.pid)
        assert any("dagster_webserver" in _cmdline(pid) for pid in started), _cmdline_list(started)
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=60)
        time.sleep(1)
        left = [pid for pid in started if alive(pid)]
        assert not left, f"left running after Ctrl-C: {_cmdline_list(left)}"
    finally:
        if make.poll() is None or any(alive(pid) for pid in descendants(make.pid)):
            with _ignore(ProcessLookupError):
                os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=30)
    output = log_path.read_text(errors="replace")
    assert not re.search(r"Warning\b|WARNING", output), output  # Python's warnings, Dagster's WARNING log lines
    with prepare_home(home, gpu_slots=5) as instance:  # already prepared: left as it is
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count >= 1
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count != 5


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cmdline_list(pids: list[int]) -> str:
    return "; ".join(f"{pid}: {_cmdline(pid)[:160]}" for pid in pids)


@contextmanager
def _ignore(*errors: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except errors:
        pass

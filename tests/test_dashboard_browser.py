"""The dashboard page in a real headless Chromium (selenium), on a real LocalCluster: it shows
the nodes and a job's progress advancing live, a failure's remote traceback, a killed node
leaving, and the polling fallback. A screenshot of each state goes to the artifacts folder
(``ACHILLES_ARTIFACTS``, default ``tmp/artifacts`` in the checkout)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, List

import pytest

import tasks
from achilles import task
from conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(180)

ARTIFACTS = Path(os.environ.get("ACHILLES_ARTIFACTS") or os.path.join(ROOT, "tmp", "artifacts"))
WAIT = 30.0


def _pids_with(marker: str) -> List[int]:
    """Processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by selenium; skipped (with the reason) only when no browser
    or driver can be had. Chromium and its driver are gone after the module."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium and chromedriver on PATH (.ci/run installs them with apt-get)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install '.[test]')")
    profile = tempfile.mkdtemp(prefix="achilles-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--disable-dev-shm-usage",
                 "--window-size=1280,1100", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(driver)
    chrome = webdriver.Chrome(service=service, options=options)
    chrome.set_page_load_timeout(WAIT)
    try:
        yield chrome
    finally:
        chrome.quit()
        wait_for(lambda: not _pids_with(profile), what="chromium to exit")
        shutil.rmtree(profile, ignore_errors=True)


def shot(browser: Any, name: str) -> None:
    """Save a screenshot of the page as ``<ARTIFACTS>/dashboard-<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / f"dashboard-{name}.png"))


def texts(browser: Any, selector: str) -> List[str]:
    """The text of every element matching a CSS selector, read in one go inside the page (the
    page re-renders while updates arrive, so element handles would go stale)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)", selector)


def until(browser: Any, condition: Any, what: str) -> Any:
    """Wait until ``condition(browser)`` is truthy and return it."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(condition, what)


def job_done(browser: Any) -> int:
    """Items done of the one running job the page shows (-1 when it shows none)."""
    shown = texts(browser, ".job .j-progress")
    if len(shown) != 1:
        return -1
    match = re.match(r"([\d,.\s]+) done", shown[0])
    return int(re.sub(r"\D", "", match.group(1))) if match else -1


@task
def held(gate: str, value: int) -> int:
    """``value``, once the file ``gate`` exists."""
    while not os.path.exists(gate):
        tasks.pause(0.01)
    return value


@task
def combine(a: int, b: int) -> int:
    return a + b


def talk_then_fail(x: int) -> int:
    """Print a line, then fail on 3."""
    print(f"about to look at item {x}")
    if x == 3:
        raise tasks.TaskFailure(f"item {x} is bad")
    return x


def test_page_follows_the_cluster_live(make_cluster, browser, tmp_path):
    """Loaded while nothing runs, the page goes live over SSE and lists both nodes; while a
    job runs it shows the job and its done count rising; a running graph is drawn task by
    task with their states; a failing task's traceback and last output line appear;
    a killed node leaves the table and the event log says so; with ?poll the page polls and
    shows the same cluster."""
    lc = make_cluster(nodes=2, processes=1)
    browser.get(lc.dashboard_url)
    until(browser, lambda b: texts(b, "#conn") == ["live"], "the page to go live over SSE")
    until(browser, lambda b: sorted(texts(b, "tr.node .n-name")) == ["local-0", "local-1"],
          "both nodes listed")

    # The job's items wait for gates the test opens one at a time, so the page is seen at
    # 10, then 20 items done whatever the machine's speed.
    gates = tmp_path / "gates"
    gates.mkdir()
    items = [(i, str(gates), 10) for i in range(30)]
    results: List[Any] = []
    runner = threading.Thread(target=lambda: results.append(
        lc.cluster.map(tasks.gated, items, chunksize=1)))
    runner.start()
    try:
        until(browser, lambda b: job_done(b) == 0, "the job, nothing done yet")
        for gate, done in ((0, 10), (1, 20)):
            (gates / str(gate)).touch()
            until(browser, lambda b: job_done(b) == done, f"the job at {done} items done")
        assert texts(browser, ".job .fn") == ["tasks.gated"]
        shot(browser, "running")
    finally:
        for gate in range(3):
            (gates / str(gate)).touch()
        runner.join(WAIT)
    assert results == [list(range(30))]
    until(browser, lambda b: any("tasks.gated" in t for t in texts(b, ".finished-job")),
          "the job listed as ended")

    gate = tmp_path / "graph-gate"
    leaves = [held(str(gate), i) for i in range(4)]
    graph = lc.cluster.submit_graph(combine(combine(leaves[0], leaves[1]),
                                            combine(leaves[2], leaves[3])))
    try:
        until(browser, lambda b: len(texts(b, ".job svg.graph circle")) == 7, "the graph drawn")
        assert any("queued" in t or "running" in t for t in texts(browser, ".job .state"))
        shot(browser, "graph")
    finally:
        gate.touch()
    assert graph.result(WAIT) == 6

    with pytest.raises(tasks.TaskFailure):
        lc.cluster.map(talk_then_fail, range(6), chunksize=1)
    until(browser, lambda b: any("in talk_then_fail" in t and "item 3 is bad" in t
                                 for t in texts(b, ".failure pre.traceback")),
          "the failure's traceback")
    assert any("tasks.TaskFailure" in t for t in texts(browser, ".failure summary"))
    assert "about to look at item 3" in texts(browser, ".failure pre.output")
    shot(browser, "failure")

    os.killpg(lc.nodes[1].pid, signal.SIGKILL)
    lc.nodes[1].wait(WAIT)
    until(browser, lambda b: texts(b, "tr.node .n-name") == ["local-0"], "the killed node gone")
    until(browser, lambda b: any("node local-1 lost" in t for t in texts(b, "#events li")),
          "the node's loss in the event log")
    shot(browser, "node-lost")

    browser.get(lc.dashboard_url + "?poll")
    until(browser, lambda b: texts(b, "#conn") == ["polling"], "the polling fallback")
    until(browser, lambda b: texts(b, "tr.node .n-name") == ["local-0"], "nodes while polling")
    assert any("item 3 is bad" in t for t in texts(browser, ".failure pre.traceback"))

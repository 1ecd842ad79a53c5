"""The MLflow UI in a real headless Chromium: experiment, parent and child runs, plots,
and the registered model with its alias."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_http

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
TINY = ["tracking.cost_card=false",  # measured in test_cost and test_integration
        "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [32]}", "teacher.train.steps=40",
        "student.train.steps=30", "student.seeds=[0]", "student.methods=[scratch, kd]", "tracking.experiment=ui-digits"]
SCREENSHOTS = Path(os.environ.get("METADISTILL_SCREENSHOTS", "results/screenshots"))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    home = tmp_path_factory.mktemp("ui-home")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["METADISTILL_HOME"] = str(home)
    summary = home / "summary.json"
    args = [x for item in TINY for x in ("--set", item)]
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *args, "--summary", str(summary)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)], env=env,
                            stdout=(home / "ui.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", 120, lambda: proc.poll() is None, lambda: "mlflow ui exited")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("ui-digits").experiment_id
    yield f"http://127.0.0.1:{port}", json.loads(summary.read_text()), exp_id, client
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def wait_text(driver, text: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = driver.find_element("tag name", "body").text
        if text in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on the page; it shows:\n{driver.find_element('tag name', 'body').text[:2000]}")


def shot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_experiment_runs_plots_and_registered_model(ui, browser):
    base, summary, exp_id, client = ui
    run_id = summary["mlflow_run_id"]
    parent = client.get_run(run_id)
    children = {r.info.run_name: r.info.run_id for r in client.search_runs(
        [exp_id], f"tags.mlflow.parentRunId = '{run_id}'")}

    browser.get(f"{base}/#/experiments")
    wait_text(browser, "ui-digits")
    shot(browser, "experiments")

    browser.get(f"{base}/#/experiments/{exp_id}/runs")
    wait_text(browser, parent.info.run_name)
    shot(browser, "experiment_runs")

    browser.get(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
    wait_text(browser, "kd_test_acc_mean")
    shot(browser, "parent_run")

    browser.get(f"{base}/#/experiments/{exp_id}/runs/{run_id}/artifacts/comparison.png")
    wait_text(browser, "comparison.png")
    rendered = "return Array.from(document.images).some(i => i.src.startsWith('blob:') && i.naturalWidth > 200)"
    deadline = time.time() + 30
    while time.time() < deadline and not browser.execute_script(rendered):
        time.sleep(0.5)
    assert browser.execute_script(rendered), "the comparison plot was not rendered"
    shot(browser, "parent_comparison_plot")

    browser.get(f"{base}/#/experiments/{exp_id}/runs/{children['student/kd/seed0']}/artifacts/learning_curve.png")
    wait_text(browser, "student/kd/seed0")
    wait_text(browser, "learning_curve.png")
    shot(browser, "child_run_learning_curve")

    model = summary["registered_model"]["name"]
    browser.get(f"{base}/#/experiments/{exp_id}/runs/{summary['mlflow_run_id']}")
    wait_text(browser, model)  # the pipeline run lists the student it registered
    shot(browser, "parent_run_registered_model")
    browser.get(f"{base}/#/models/{model}")
    wait_text(browser, "champion")
    wait_text(browser, "Version 1")
    shot(browser, "registered_model")


def test_experiment_opens_on_its_training_runs(ui, browser):
    """The experiment is tagged custom_model_development, so MLflow 3 opens it on the runs
    table, not on the GenAI overview (traces, token usage)."""
    base, summary, exp_id, client = ui
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(summary["mlflow_run_id"])
    printed = (Path(client.tracking_uri.removeprefix("sqlite:///")).with_name("ui.log")).read_text()
    link = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.strip().startswith("ui-digits: "))
    assert link.startswith(base), printed  # the link `metadistill ui` prints for the experiment
    browser.get(link)
    body = wait_text(browser, parent.info.run_name)
    shot(browser, "experiment_first_view")
    url = browser.current_url
    assert "/overview" not in url and "/traces" not in url, url
    assert "student/kd/seed0" in body or "Run Name" in body or "Run name" in body, body[:1500]


def _serving(port: int) -> list[int]:
    """Pids of processes whose command line serves ``port`` (the UI and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mlflow" in b" ".join(cmdline) and str(port).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_ui_prints_links_once_it_answers_and_a_plain_kill_stops_the_whole_server(tmp_path):
    import signal
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["METADISTILL_HOME"] = str(tmp_path / "home")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--port", str(port)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        for line in proc.stderr:
            if line.startswith("MLflow UI on"):
                break
            assert time.time() < deadline, "no links within 180 s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:  # answers already
            assert answer.status == 200
        assert "Default: http://127.0.0.1" in proc.stderr.readline()
        assert _serving(port)
        proc.send_signal(signal.SIGTERM)  # the CLI alone, as `kill <pid>` or a supervisor would
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 20
        while _serving(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not _serving(port), "the server outlived the command"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()

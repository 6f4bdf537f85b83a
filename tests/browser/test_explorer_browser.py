"""The explorer as a user meets it: JupyterLab in headless Chromium runs notebooks/05_explorer.ipynb, a slider is
moved, the plot must change, and no cell may error. Screenshots go to artifacts/browser/ (gitignored).

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``) and the Python package
``playwright`` (pointed at that binary; it never downloads a browser). Skipped unless asked for: see conftest.py.
The server runs on a copy of notebooks/ and is always shut down, kernels included, even when the test fails.
"""
from __future__ import annotations

import time

import nbformat
import pytest

from lab_driver import (CHROMIUM, CHROMIUM_ARGS, NB, REPO, JupyterLabServer, error_outputs, plots, run_all_cells,
                        save_and_read, select_kernel_if_asked, sliders, wait_for_notebook, wait_until_executed)

pytestmark = pytest.mark.browser

EXPLORER = "05_explorer.ipynb"
ARTIFACTS = REPO / "artifacts" / "browser"
RUN_TIMEOUT_S = 600  # all cells of the explorer, quick profile, on a 2-core CPU
PLOT_UPDATE_TIMEOUT_S = 120  # one slider move: the callback may recompute on the model


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    server = JupyterLabServer(tmp_path_factory.mktemp("jupyterlab"))
    with server:
        yield server
    assert server.proc is None and not server._own_kernel_pids(), "the server or a kernel survived shutdown"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    yield page
    report = getattr(request.node, "rep_call", None)  # set by conftest.pytest_runtest_makereport
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"FAILED_{request.node.name}.png"))
    context.close()


def open_and_run(page, lab: JupyterLabServer, name: str) -> dict:
    page.goto(lab.url(f"lab/tree/{name}?reset"))  # a fresh workspace: only this notebook open
    wait_for_notebook(page, 120_000)
    select_kernel_if_asked(page)
    run_all_cells(page, lab, name)
    return wait_until_executed(page, lab, name, RUN_TIMEOUT_S)


def wait_for_plot_change(page, before: list[str], timeout_s: float) -> list[str] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = plots(page)
        if now and now != before:
            return now
        time.sleep(0.5)
    return None


def test_explorer_runs_and_a_slider_changes_the_plot(lab, page):
    t0 = time.monotonic()
    assert (lab.notebooks / EXPLORER).exists(), f"notebooks/{EXPLORER} does not exist"
    state = open_and_run(page, lab, EXPLORER)
    ran_s = time.monotonic() - t0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer_after_run.png"))
    assert not state["errors"], f"a cell errored:\n{state['errors'][0]}"
    assert not state["widgetErrors"], f"a widget failed to render: {state['widgetErrors']}"

    before = plots(page)
    assert before, "the explorer shows no plotly figure"
    handles = sliders(page)
    assert handles, "the explorer shows no slider"

    moved = []
    for slider in handles:
        old_readout = slider["readout"]()
        slider["handle"].scroll_into_view_if_needed()
        slider["handle"].focus()
        slider["handle"].press("ArrowRight")
        if slider["readout"]() == old_readout:  # already at its maximum: go the other way
            slider["handle"].press("ArrowLeft")
            slider["handle"].press("ArrowLeft")
        moved.append(f"{slider['label']!r}: {old_readout} -> {slider['readout']()}")
        after = wait_for_plot_change(page, before, PLOT_UPDATE_TIMEOUT_S)
        if after is not None:
            break
    else:
        pytest.fail(f"no slider move changed a plot; moved {moved}")
    state = wait_until_executed(page, lab, EXPLORER, PLOT_UPDATE_TIMEOUT_S)  # the callback has finished
    assert not state["errors"], f"the slider callback errored:\n{state['errors'][0]}"
    after = plots(page)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    page.screenshot(path=str(ARTIFACTS / "explorer_after_slider.png"))
    if changed:
        plot = page.locator(f"{NB} .js-plotly-plot").nth(changed[0])
        plot.scroll_into_view_if_needed()
        plot.screenshot(path=str(ARTIFACTS / "explorer_plot_after_slider.png"))
    print(f"explorer: all cells ran in {ran_s:.1f} s; slider {moved[-1]} changed {len(changed)} of {len(before)} "
          f"plots ({len(after)} after); total {time.monotonic() - t0:.1f} s")
    assert changed or len(after) != len(before)
    saved = save_and_read(page, lab, EXPLORER)  # the server's copy, never the committed notebook
    assert error_outputs(saved) == []
    code_cells = [c for c in saved.cells if c.cell_type == "code" and c.source.strip()]
    assert all(c.execution_count is not None for c in code_cells), "a code cell did not run"


def test_the_checks_catch_a_failing_cell(lab, page):
    """The error check above can fail: a notebook with a warning on stderr and a raising cell is caught, the
    warning is not counted as an error."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import sys, warnings\nwarnings.warn('only a warning')\nprint('to stderr', file=sys.stderr)"),
        nbformat.v4.new_code_cell("raise RuntimeError('deliberate failure for the browser self-check')"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, lab.notebooks / "_browser_selfcheck.ipynb")
    state = open_and_run(page, lab, "_browser_selfcheck.ipynb")
    assert len(state["errors"]) == 1 and "deliberate failure" in state["errors"][0]
    saved = save_and_read(page, lab, "_browser_selfcheck.ipynb")
    assert error_outputs(saved) == ["cell 1: RuntimeError: deliberate failure for the browser self-check"]

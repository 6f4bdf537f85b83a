"""Browser tests: skipped unless asked for, because they need Chromium (/usr/bin/chromium) and start JupyterLab.

Run them with ``make test-browser``, or ``pytest tests/browser --run-browser``, or set ``LRSA_VIZ_BROWSER=1``
(the environment variable also works from ``pytest tests``, where this conftest's option is not registered).
"""
from __future__ import annotations

import os

import pytest

BROWSER_ENV = "LRSA_VIZ_BROWSER"


def pytest_addoption(parser):
    parser.addoption("--run-browser", action="store_true", default=False,
                     help="run the real-browser tests (JupyterLab + headless Chromium via Playwright)")


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (make test-browser)")


def browser_tests_requested(config) -> bool:
    try:
        flag = config.getoption("--run-browser")
    except ValueError:  # option not registered: pytest was started above tests/browser
        flag = False
    return bool(flag) or os.environ.get(BROWSER_ENV, "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if browser_tests_requested(config):
        return
    skip = pytest.mark.skip(reason=f"browser test: run `make test-browser`, `pytest tests/browser --run-browser` or set {BROWSER_ENV}=1")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``item.rep_call``) so a fixture can screenshot a failed test."""
    outcome = yield
    report = outcome.get_result()
    if "browser" in item.keywords:
        setattr(item, f"rep_{report.when}", report)

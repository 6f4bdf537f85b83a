"""Drive a real JupyterLab in headless Chromium (Playwright pointed at Debian's /usr/bin/chromium; no download).

`JupyterLabServer` starts ``jupyter lab`` on a free localhost port with a random token on a COPY of the
repository's notebooks/ (the rest of the checkout is linked next to it, so ``Path("..") / "data"`` works and
nothing the browser saves can touch a committed notebook) and always shuts it down, kernels included.
`run_notebook` opens a notebook, runs all cells and reports what the page shows.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("LRSA_VIZ_CHROMIUM", "/usr/bin/chromium"))
# The flags the machine notes give for headless Chromium as root in a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
NOT_LINKED = {".git", "notebooks", "artifacts", ".venv", ".pytest_cache", "build"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JupyterLabServer:
    """``with JupyterLabServer(workdir) as lab: lab.url(...)``; the server is stopped on exit, even on failure."""

    workdir: Path
    source_notebooks: Path = REPO / "notebooks"
    startup_timeout_s: float = 120.0
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen | None = None

    @property
    def notebooks(self) -> Path:
        return self.workdir / "root" / "notebooks"

    @property
    def runtime_dir(self) -> Path:
        return self.workdir / "runtime"

    @property
    def log_path(self) -> Path:
        return self.workdir / "jupyterlab.log"

    def url(self, path: str = "") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def _prepare(self) -> None:
        root = self.workdir / "root"
        root.mkdir(parents=True)
        for entry in REPO.iterdir():
            if entry.name not in NOT_LINKED:
                (root / entry.name).symlink_to(entry)
        shutil.copytree(self.source_notebooks, self.notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        for d in ("runtime", "config", "settings", "workspaces"):
            (self.workdir / d).mkdir()
        # user settings: no autosave (the copy stays as it was), no news or update checks (closed network)
        for plugin, values in {"docmanager-extension/plugin": {"autosave": False},
                               "notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the DOM
                               "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
            path = self.workdir / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))

    def start(self) -> "JupyterLabServer":
        self._prepare()
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            JUPYTER_CONFIG_DIR=str(self.workdir / "config"),
            JUPYTERLAB_SETTINGS_DIR=str(self.workdir / "settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(self.workdir / "workspaces"),
            TQDM_DISABLE="1",
            LRSA_VIZ_PROFILE=env.get("LRSA_VIZ_PROFILE", "quick"),
        )
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.notebooks}", f"--LabApp.user_settings_dir={self.workdir / 'settings'}",
            f"--LabApp.workspaces_dir={self.workdir / 'workspaces'}", "--LabApp.news_url=",
            "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI containers run as root
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.notebooks,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer within {self.startup_timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def kernel_state(self, notebook: str) -> str | None:
        """Execution state of the kernel of ``notebook``'s session ('idle', 'busy', ...), None if it has none."""
        with urllib.request.urlopen(self.url("api/sessions"), timeout=5) as r:
            for session in json.load(r):
                if Path(session.get("path", "")).name == Path(notebook).name and session.get("kernel"):
                    return session["kernel"].get("execution_state")
        return None

    def _own_kernel_pids(self) -> list[int]:
        """Processes started for this server's kernels: their command line names our private runtime dir."""
        pids = []
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if str(self.runtime_dir).encode() in (proc_dir / "cmdline").read_bytes():
                    pids.append(int(proc_dir.name))
        return pids

    def stop(self) -> None:
        """Graceful shutdown (kernels too), then SIGTERM/SIGKILL of the server's process group and any kernel left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, urllib.error.URLError):
                req = urllib.request.Request(self.url("api/shutdown"), method="POST")
                urllib.request.urlopen(req, timeout=10).close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=wait)
        for pid in self._own_kernel_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def __enter__(self) -> "JupyterLabServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------------------
# Page helpers (Playwright sync API; the page is a JupyterLab 4 notebook tab). Selectors are scoped to the
# visible notebook panel, so a notebook left open in another tab cannot answer for the one under test.

NB = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"

JS_CELL_STATE = r"""(nb) => {
  const cells = Array.from(document.querySelectorAll(nb + ' .jp-CodeCell'));
  const prompts = cells.map(c => (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '');
  // JupyterLab renders an error output as stderr text holding the traceback
  const errors = Array.from(document.querySelectorAll(
      nb + ' .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
      .map(e => e.innerText).filter(t => /Traceback \(most recent call last\)/.test(t)).map(t => t.slice(0, 3000));
  const widgetErrors = Array.from(document.querySelectorAll(nb + ' .jp-OutputArea-output'))
      .map(e => e.innerText).filter(t => /Error displaying widget|Failed to load model class|Error rendering/.test(t))
      .map(t => t.slice(0, 500));
  return {n: cells.length, prompts, errors, widgetErrors};
}"""

JS_PLOTS = """(nb) => Array.from(document.querySelectorAll(nb + ' .js-plotly-plot')).map(el => JSON.stringify({
  data: el.data || null, layout: el.layout ? {title: el.layout.title, shapes: el.layout.shapes} : null,
  svg: (el.querySelector('.main-svg') || {}).innerHTML ? el.querySelector('.main-svg').innerHTML.length : 0}))"""


def wait_for_notebook(page, timeout_ms: float) -> None:
    page.wait_for_selector(f"{NB} .jp-CodeCell", timeout=timeout_ms)


def select_kernel_if_asked(page) -> None:
    """A notebook stripped of its kernelspec makes JupyterLab ask for a kernel: take the default one."""
    with contextlib.suppress(Exception):
        dialog = page.wait_for_selector(".jp-Dialog", timeout=5_000)
        if dialog is not None:
            dialog.query_selector(".jp-mod-accept").click()


def wait_for_kernel(lab: "JupyterLabServer", notebook: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.kernel_state(notebook) == "idle":
            return
        time.sleep(0.5)
    raise TimeoutError(f"the kernel of {notebook} was not idle within {timeout_s} s ({lab.kernel_state(notebook)})")


def run_all_cells(page, lab: "JupyterLabServer", notebook: str, timeout_s: float = 120.0) -> None:
    """Menu Run > Run All Cells once the kernel is idle; retried if no cell starts (the menu can be early)."""
    wait_for_kernel(lab, notebook, timeout_s)
    for _ in range(3):
        page.click(NB)  # focus the notebook
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        with contextlib.suppress(Exception):
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('" + NB + " .jp-CodeCell .jp-InputArea-prompt'))"
                ".some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))", timeout=15_000)
            return
    raise TimeoutError("Run All Cells did not start any cell")


def wait_until_executed(page, lab: JupyterLabServer, notebook: str, timeout_s: float) -> dict:
    """Wait until every code cell has an execution count and the kernel has been idle for 2 s."""
    deadline = time.monotonic() + timeout_s
    idle_since = None
    state = {}
    while time.monotonic() < deadline:
        state = page.evaluate(JS_CELL_STATE, NB)
        done = state["n"] > 0 and all(p.strip().startswith("[") and "*" not in p and p.strip() != "[ ]:"
                                      for p in state["prompts"])
        if state["errors"]:
            return state
        if done and lab.kernel_state(notebook) == "idle":
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= 2:
                return state
        else:
            idle_since = None
        time.sleep(0.5)
    raise TimeoutError(f"cells not executed within {timeout_s} s; prompts: {state.get('prompts')}")


def plots(page) -> list[str]:
    return page.evaluate(JS_PLOTS, NB)


def sliders(page):
    """The ipywidgets slider handles in the notebook, with their descriptions."""
    out = []
    for box in page.query_selector_all(f"{NB} .widget-slider"):
        handle = box.query_selector(".noUi-handle")
        label = box.query_selector(".widget-label")
        readout = box.query_selector(".widget-readout")
        if handle is not None:
            out.append(dict(handle=handle, label=(label.inner_text() if label else ""),
                            readout=(lambda r=readout: r.inner_text() if r else "")))
    return out


def save_and_read(page, lab: JupyterLabServer, name: str, timeout_s: float = 30.0):
    """Save the notebook from the browser (into the server's copy) and read it back with nbformat."""
    import nbformat

    path = lab.notebooks / name
    before = path.stat().st_mtime_ns
    page.click(NB)
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + timeout_s
    while path.stat().st_mtime_ns == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not saved within {timeout_s} s")
        time.sleep(0.2)
    time.sleep(0.5)  # let the write finish
    return nbformat.read(path, as_version=4)


def error_outputs(notebook) -> list[str]:
    """``ename: evalue`` of every error output of a saved notebook."""
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" for o in cell.get("outputs", []) if o.get("output_type") == "error"]

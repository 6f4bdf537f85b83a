"""The GPU half of the test suite in one command: every unit test (the CUDA ones run, nothing is skipped for want of
a GPU) and every notebook in its full profile through nbval, spread over the visible GPUs; one JSON record.

    bash scripts/gpu_check.sh [RESULTS_DIR]         # RESULTS_DIR default: data/results

Writes RESULTS_DIR/gpu_check.json (pass/fail and wall time of each part, CUDA tests by name, GPU names, torch
version, the command) and RESULTS_DIR/gpu_check.log (every part's whole output). Exit status 1 if any
part failed. Parts run longest first, ``--jobs-per-gpu`` at a time on each GPU, each with its share of the CPU
threads (unit tests use pytest-xdist workers when pytest-xdist is installed). ``--parts units
notebooks/01_lagkv_step_by_step.ipynb ...`` runs a subset; ``--time-limit S`` stops what still runs after S seconds
and records it as timed out, with its verbose output so far (which test or cell it was in) and the counts of the
tests that had finished (``tests.partial``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Minutes of each part on one H200, for scheduling only (longest first; unknown parts count as 3): from runs alone
#: (04: 315 s, 05: 155 s, 06: 148 s) and the units in run d (363 s, sharing the GPU with notebook 05).
EXPECTED_MIN = {"units": 6, "notebooks/04_finetune.ipynb": 6, "notebooks/05_explorer.ipynb": 3,
                "notebooks/06_performance.ipynb": 3}
NBVAL = ["--nbval-lax", "--nbval-current-env", "--sanitize-with", "notebooks/sanitize.cfg"]


def gpu_names() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def uses_xdist(part: str, workers: int) -> bool:
    return part == "units" and workers > 1 and has_module("xdist")


def part_command(part: str, junit: Path, workers: int) -> list[str]:
    """pytest for one part, verbose (a part stopped at the time limit shows which test or cell it was in)."""
    base = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if part == "units":
        # worksteal: an idle worker takes queued tests from a busy one (the slow CUDA tests otherwise pile up on one)
        xdist = ["-n", str(workers), "--dist", "worksteal"] if uses_xdist(part, workers) else []
        return base + xdist + ["--durations=25", "tests"]
    return base + NBVAL + [part]


def outcome(result: dict) -> str:
    return "TIMED OUT" if result.get("timed_out") else ("PASS" if result["passed"] else "FAIL")


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def junit_summary(path: Path) -> dict:
    """Counts and the outcome of every test whose name mentions cuda, from a pytest JUnit XML file."""
    if not path.exists():
        return {"error": "no junit report"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    cuda, failures = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome = "failed" if problem is not None else ("skipped" if case.find("skipped") is not None else "passed")
        counts[outcome] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if "cuda" in name.lower():
            cuda[name] = outcome
        if problem is not None:  # the assertion message and the end of the traceback: the numbers of a failure
            failures[name] = ((problem.get("message") or "")[:1000] + "\n" + (problem.text or "")[-2000:]).strip()
    return {**counts, "cuda_tests": cuda, "failures": failures}


def visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's GPU ``index``: with CUDA_VISIBLE_DEVICES=2,3 set for the
    check, its GPU 0 is the machine's GPU 2 (a part given "0" would run on the machine's GPU 0)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


def run_part(part: str, gpu: int, workdir: Path, workers: int, threads: int, deadline: float | None) -> dict:
    """Run one part on GPU ``gpu`` with ``threads`` CPU threads; stop it at ``deadline`` (unix time) if it is still
    running then (recorded as ``timed_out`` with its output so far)."""
    junit = workdir / (part.replace("/", "_") + ".xml")
    per_process = max(1, threads // workers) if uses_xdist(part, workers) else threads  # xdist workers share them
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible_device(gpu), "LRSA_VIZ_PROFILE": "full", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(per_process), "MKL_NUM_THREADS": str(per_process),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    junit.unlink(missing_ok=True)  # a part that dies before its report must not show an earlier run's
    start = time.time()
    proc = subprocess.Popen(part_command(part, junit, workers), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    RUNNING.add(proc)
    try:
        output, _ = proc.communicate(timeout=None if deadline is None else max(deadline - time.time(), 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the notebook kernels too
        output, _ = proc.communicate()
        timed_out = True
    finally:
        RUNNING.discard(proc)
    wall = time.time() - start
    return {"part": part, "gpu": gpu, "passed": proc.returncode == 0 and not timed_out, "returncode": proc.returncode,
            "timed_out": timed_out, "wall_s": round(wall, 1), "threads": threads,
            "tests": verbose_summary(output) if timed_out else junit_summary(junit), "output": output}


def verbose_summary(output: str) -> dict:
    """Counts of a part stopped before its JUnit report, from its verbose output (pytest -v prints each test's
    outcome; with xdist as "[gw3] [ 41%] PASSED tests/..."): what had finished when it was stopped."""
    import re

    counts = {"passed": 0, "failed": 0, "skipped": 0}
    progress_line = r"^(?:\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED) |\S+::.* (PASSED|FAILED|ERROR|SKIPPED)\s+\[\s*\d+%\]$)"
    for outcome in (a or b for a, b in re.findall(progress_line, output, flags=re.M)):
        counts["failed" if outcome in ("FAILED", "ERROR") else outcome.lower()] += 1
    return {**counts, "partial": True}


#: Parts running now. Each runs in its own process group (so that a time limit can stop its notebook kernels too),
#: which an outer `timeout` or Ctrl-C does not reach: `stop_parts_on_signal` stops them with this process.
RUNNING: set[subprocess.Popen] = set()


def stop_parts_on_signal() -> dict:
    """Install SIGTERM/SIGINT handlers that kill the running parts' groups; returns the previous handlers."""
    def stop(signum, _frame):
        for proc in list(RUNNING):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}


def usable_cores() -> int:
    """The cores this process may run on (``taskset`` / cgroup affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this OS
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default="data/results", help="directory for gpu_check.json / .log")
    parser.add_argument("--parts", nargs="+", help="subset: 'units' and/or notebook paths (default: all)")
    parser.add_argument("--workdir", default="/tmp/lrsa_viz_gpu_check")
    parser.add_argument("--jobs-per-gpu", type=int, default=1,
                        help="parts run at once on each GPU (notebooks are mostly host-bound: 4 fit an H200 and its "
                             "16 cores; wall times then include the sharing)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: parts still running then are stopped and recorded as timed out, parts not "
                             "started are listed as not finished (default: no limit)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; this command checks the GPU half (CPU CI runs `make test`)", file=sys.stderr)
        return 2
    parts = args.parts or ["units"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
    parts.sort(key=lambda p: -EXPECTED_MIN.get(p, 3))
    slots = [g for g in range(torch.cuda.device_count()) for _ in range(max(1, args.jobs_per_gpu))]
    cores = usable_cores()
    workers = max(1, min(8, cores // (2 * len(slots))))
    # parts side by side share the CPU cores: each gets its share of threads (16 threads per part on 16 cores,
    # 4-5 parts at once, ran 1.3-3.6x slower than the parts alone: notebooks 04 and 06, H200 host, 2026-11-29)
    threads_per_part = max(1, cores // len(slots))
    deadline = None if args.time_limit is None else time.time() + args.time_limit
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue[str] = queue.Queue()
    for p in parts:
        todo.put(p)
    results: list[dict] = []
    lock = threading.Lock()

    def worker(gpu: int) -> None:
        while True:
            try:
                part = todo.get_nowait()
            except queue.Empty:
                return
            if deadline is not None and time.time() > deadline - 5:
                return  # not started: listed as not finished
            result = run_part(part, gpu, workdir, workers, threads_per_part, deadline)
            with lock:
                results.append(result)
                write_record()
                print(f"[gpu {gpu}] {part}: {outcome(result)} in {result['wall_s']} s", flush=True)

    start = time.time()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    command = "bash scripts/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv)

    def write_record() -> dict:
        """The record so far (called after every part, so that a run stopped at a time limit still leaves one)."""
        import transformers

        done = sorted(results, key=lambda r: parts.index(r["part"]))
        record = {
            "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "gpus": gpu_names(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "complete": len(done) == len(parts) and not any(r["timed_out"] for r in done),
            "all_passed": len(done) == len(parts) and all(r["passed"] for r in done),
            "not_finished": [p for p in parts if p not in {r["part"] for r in done}],
            "timed_out": [r["part"] for r in done if r["timed_out"]],
            "wall_s": round(time.time() - start, 1), "jobs_per_gpu": max(1, args.jobs_per_gpu),
            "threads_per_part": threads_per_part, "time_limit_s": args.time_limit,
            "parts": [{k: v for k, v in r.items() if k != "output"} for r in done],
        }
        (out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
        (out / "gpu_check.log").write_text("".join(
            f"==== {r['part']} (gpu {r['gpu']}, {r['wall_s']} s, {outcome(r)})\n{r['output']}\n"
            for r in done))
        return record

    # convert the default model once before parts run side by side (each would otherwise convert it at the same time)
    subprocess.run([sys.executable, "-c", "from lrsa_viz import load_model; load_model(device='cpu')"], cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
                   check=True)
    previous = stop_parts_on_signal()
    try:
        pool = [threading.Thread(target=worker, args=(g,)) for g in slots]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    with lock:
        record = write_record()
    print(json.dumps({k: record[k] for k in ("all_passed", "wall_s", "gpus", "torch")}))
    return 0 if record["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

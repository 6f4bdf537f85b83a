"""scripts/gpu_check.py on a machine without CUDA: a clear refusal, its JUnit summary read correctly, a part stopped
at the time limit recorded as timed out with its output, the CPU threads given to each part."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, import_script


def import_gpu_check():
    return import_script("scripts", "gpu_check")


def test_gpu_check_refuses_without_cuda_and_reads_junit(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(tmp_path)],
                          capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    assert 1 <= import_gpu_check().usable_cores() <= (os.cpu_count() or 1)
    gpu_check = import_gpu_check()
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_fast" name="test_cuda_x"/>'
                   '<testcase classname="t" name="b"><failure message="assert 3 &lt; 2">Traceback ... line 9</failure>'
                   '</testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_summary(xml) == {"passed": 1, "failed": 1, "skipped": 1,
                                            "cuda_tests": {"tests.test_fast::test_cuda_x": "passed"},
                                            "failures": {"t::b": "assert 3 < 2\nTraceback ... line 9"}}


def test_a_part_past_the_time_limit_is_stopped_and_recorded(tmp_path, monkeypatch):
    gpu_check = import_gpu_check()
    script = ("import os, sys, time; print('threads', os.environ['OMP_NUM_THREADS'], flush=True); "
              "print('[gw0] [ 50%] PASSED tests/test_a.py::test_x', flush=True); time.sleep(float(sys.argv[1]))")
    monkeypatch.setattr(gpu_check, "part_command", lambda part, junit, workers: [sys.executable, "-c", script, part])
    t0 = time.time()
    slow = gpu_check.run_part("60", 0, tmp_path, 1, threads=3, deadline=time.time() + 10)
    assert time.time() - t0 < 30, "stopped at the deadline, not after the part's 60 s"
    assert slow["timed_out"] and not slow["passed"] and "threads 3" in slow["output"]
    assert slow["tests"] == {"passed": 1, "failed": 0, "skipped": 0, "partial": True}  # what finished before the stop
    assert gpu_check.outcome(slow) == "TIMED OUT"
    quick = gpu_check.run_part("0", 0, tmp_path, 1, threads=2, deadline=time.time() + 60)
    assert quick["passed"] and not quick["timed_out"] and "threads 2" in quick["output"]
    assert quick["threads"] == 2 and gpu_check.outcome(quick) == "PASS"


def test_main_schedules_parts_with_their_thread_share_and_records_booleans(tmp_path, monkeypatch):
    """main() on a pretend one-GPU machine: two parts side by side, one failing after some passing tests; the
    record's pass flags are booleans from the exit status (not test counts) and each part gets cores // 2 threads."""
    gpu_check = import_gpu_check()
    monkeypatch.setattr(gpu_check, "usable_cores", lambda: 8)  # a pretend 8-core machine: 2 parts, 4 threads each
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "gpu_names", lambda: ["pretend GPU"])
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: None)  # no model conversion
    script = ("import os, sys; print('threads', os.environ['OMP_NUM_THREADS']); "
              "open(sys.argv[2], 'w').write('<testsuites><testsuite><testcase classname=\"t\" name=\"a\"/>'"
              " + ('<testcase classname=\"t\" name=\"b\"><failure message=\"err 0.03 > 0.02\"/></testcase>' if sys.argv[1] == 'bad' else '')"
              " + '</testsuite></testsuites>'); sys.exit(sys.argv[1] == 'bad')")
    monkeypatch.setattr(gpu_check, "part_command",
                        lambda part, junit, workers: [sys.executable, "-c", script, part, str(junit)])
    status = gpu_check.main([str(tmp_path), "--parts", "good", "bad", "--jobs-per-gpu", "2", "--time-limit", "120",
                             "--workdir", str(tmp_path / "work")])
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    share = 4
    assert status == 1 and record["complete"] and not record["all_passed"] and record["threads_per_part"] == share
    parts = {p["part"]: p for p in record["parts"]}
    assert parts["good"]["passed"] is True and parts["bad"]["passed"] is False
    assert parts["bad"]["tests"]["passed"] == 1 and parts["bad"]["tests"]["failed"] == 1
    assert parts["bad"]["tests"]["failures"] == {"t::b": "err 0.03 > 0.02"}, "a failure's message is recorded"
    assert f"threads {share}" in (tmp_path / "gpu_check.log").read_text()


def test_parts_run_on_the_gpus_this_check_was_given(monkeypatch):
    """gpu_check run with CUDA_VISIBLE_DEVICES=2,3 (beside other work on GPUs 0-1) gives its parts GPUs 2 and 3."""
    gpu_check = import_gpu_check()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [gpu_check.visible_device(i) for i in (0, 1)] == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [gpu_check.visible_device(i) for i in (0, 1)] == ["0", "1"]


def test_a_signal_stops_the_running_parts_too():
    """Parts run in their own process groups (out of reach of an outer `timeout`): SIGTERM to the check kills them."""
    gpu_check = import_gpu_check()
    part = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    gpu_check.RUNNING.add(part)
    previous = gpu_check.stop_parts_on_signal()
    try:
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert part.wait(timeout=10) == -signal.SIGKILL
    finally:
        gpu_check.RUNNING.discard(part)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_verbose_summary_counts_progress_lines_only():
    """A stopped part's counts come from pytest -v progress lines, with and without xdist; the end-of-run summary
    ("FAILED tests/...") and test names that contain an outcome word are not counted again."""
    output = "\n".join([
        "tests/test_a.py::test_x PASSED                                   [ 25%]",
        "tests/test_a.py::test_PASSED_name[a b] FAILED                    [ 50%]",
        "[gw1] [ 75%] SKIPPED tests/test_b.py::test_y ",
        "[gw0] [100%] ERROR tests/test_b.py::test_z ",
        "FAILED tests/test_a.py::test_PASSED_name[a b] - assert 1 == 2",
    ])
    assert import_gpu_check().verbose_summary(output) == {"passed": 1, "failed": 2, "skipped": 1, "partial": True}

"""scripts/gpu_check.py on a machine without CUDA: a clear refusal, and its JUnit summary read correctly."""
import subprocess
import sys
from pathlib import Path

import torch


def test_gpu_check_refuses_without_cuda_and_reads_junit(tmp_path):
    root = Path(__file__).resolve().parents[1]
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py"), str(tmp_path)],
                              capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
        assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    sys.path.insert(0, str(root / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_fast" name="test_cuda_x"/>'
                   '<testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_summary(xml) == {"passed": 1, "failed": 1, "skipped": 1,
                                            "cuda_tests": {"tests.test_fast::test_cuda_x": "passed"}}

"""Tests of tests/gpu_check.py, the one-command GPU check, on a machine without a GPU: it must
run there, skip every GPU step saying why and exit 0; its step runner must survive failing
and hanging steps and keep to its time budget; and its verdicts on pytest's and
compute-sanitizer's output must be right."""

import os
import subprocess
import sys

import pytest

import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_STEPS = ["build", "cuda-tests", "memcheck", "racecheck", "bench-op", "dcgan", "dcgan-compile",
             "dcgan-torchrun", "bench-train", "bench-inception", "bench-fid"]


def report_rows(report):
    """{step: (result, why)} from the report's table."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] in ("passed", "failed", "skipped"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def test_cpu_only_run_skips_the_gpu_steps_and_exits_0(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this checks the CPU-only path everywhere
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(130):
        (faces / f"{i}.jpg").write_bytes(b"not decoded in CPU mode")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "tests/gpu_check.py", "--faces", str(faces), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "out" / "report.md").read_text()
    rows = report_rows(report)
    assert list(rows) == ["environment", "flags"] + GPU_STEPS
    assert rows["environment"][0] == "passed" and rows["flags"][0] == "passed", rows
    for step in GPU_STEPS:
        assert rows[step][0] == "skipped" and "no CUDA GPU" in rows[step][1], (step, rows[step])
    assert "torch " in report and "GPU: none" in report  # the versions are in the report
    assert not (tmp_path / "out" / "work").exists()  # scratch removed without --keep


def test_bad_arguments_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "tests/gpu_check.py", "--faces", str(tmp_path / "nowhere")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--faces" in result.stderr and "no such folder" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "tests/gpu_check.py", "--fid-images", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--fid-images >= 2" in result.stderr and "Traceback" not in result.stderr


def test_failing_and_hanging_steps_do_not_stop_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP_SECONDS", 1)
    context = {"out": str(tmp_path), "gpu": True, "env": dict(os.environ)}
    steps = [
        gpu_check.Step("fails", 10, ["sh", "-c", "echo broken; exit 3"]),
        # a child that outlives its shell: the whole process group must go at the timeout
        gpu_check.Step("hangs", 1, ["sh", "-c", "sleep 60 & wait"]),
        gpu_check.Step("passes", 10, ["sh", "-c", "echo fine"]),
        gpu_check.Step("eats the budget", 100, ["sh", "-c", "sleep 60"]),
        gpu_check.Step("too late", 10, ["sh", "-c", "echo never"]),
    ]
    results = gpu_check.run_steps(steps, context, budget=5, report_path=str(tmp_path / "report.md"))
    outcome = {r.name: (r.status, r.why) for r in results}
    assert outcome["fails"] == ("failed", "exit status 3")
    assert outcome["hangs"] == ("failed", "timed out after 1 s")
    assert outcome["passes"] == ("passed", "")
    assert outcome["eats the budget"][0] == "failed" and "timed out" in outcome["eats the budget"][1]
    assert outcome["too late"][0] == "skipped" and "budget of 5 s is spent" in outcome["too late"][1]
    assert sum(r.seconds for r in results) < 5 + 1
    report = (tmp_path / "report.md").read_text()
    assert "broken" in report and report_rows(report)["passes"] == ("passed", "")


@pytest.mark.parametrize("output,returncode,verdict", [
    ("....\n5 passed in 3.21s\n", 0, "passed"),
    ("SKIPPED [1] tests/test_fused_op.py:9: needs a CUDA GPU\n4 passed, 1 skipped in 2.00s\n", 0, "failed"),
    ("F...\n1 failed, 4 passed in 2.00s\n", 1, "failed"),
])
def test_pytest_verdict(output, returncode, verdict):
    assert gpu_check.judge_pytest(returncode, output)[0] == verdict


@pytest.mark.parametrize("output,returncode,verdict", [
    ("========= COMPUTE-SANITIZER\n13 passed in 80.0s\n========= ERROR SUMMARY: 0 errors\n", 0, "passed"),
    ("========= Invalid __global__ read of size 1 bytes\n13 passed in 80.0s\n"
     "========= ERROR SUMMARY: 2 errors\n", 0, "failed"),
    ("3 passed in 9.0s\n========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
     "========= ERROR SUMMARY: 0 errors\n", 0, "failed"),
    ("3 passed in 9.0s\n", 0, "failed"),  # no summary: the sanitizer did not run
])
def test_sanitizer_verdict(output, returncode, verdict):
    assert gpu_check.judge_sanitizer(returncode, output)[0] == verdict


def test_faces_subset_takes_the_first_images_in_numeric_order(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(12):
        (faces / f"{i}.jpg").write_bytes(bytes([i]))
    (faces / "notes.txt").write_text("not an image")
    subset, count = gpu_check.subset_of_faces(str(faces), 10, str(tmp_path))
    assert count == 10 and sorted(os.listdir(subset), key=lambda n: int(n[:-4])) == [f"{i}.jpg" for i in range(10)]

"""bench.py runs end to end (tiny settings): every README figure comes from it, so it must not
rot. No speed is asserted here: speed goals are met in the benchmark, not in timed tests."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
    result = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--seconds", "0.01", "--rounds", "1", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_op_section():
    out = run_bench("--only", "op", "--batch-size", "16")
    for row in ["32->32 fused warp_batch", "96->64 chain of PyTorch ops", "Pillow + DataLoader(2 workers)",
                "DiffAugment 64x64 fwd+bwd reference"]:
        assert row in out


def test_train_and_inception_sections():
    out = run_bench("--only", "train,inception", "--workloads", "shapes", "--max-images", "200",
                    "--train-batch-size", "8", "--images", "20")
    assert "train: fused (dcgan.py)" in out and "data alone: DataLoader (2 workers)" in out
    assert "reference (Dataset + DataLoader, batch 32, fp32)" in out and "ours + channels_last" in out


def test_unknown_section_is_an_error():
    result = subprocess.run([sys.executable, "bench.py", "--only", "nope"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown section 'nope'" in result.stderr

"""bench.py runs end to end (tiny settings): every README figure comes from it, so it must not
rot. No speed is asserted here: speed goals are met in the benchmark, not in timed tests."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
    result = subprocess.run([sys.executable, "tools/bench.py", "--device", "cpu", "--seconds", "0.01", "--rounds", "1",
                             *args],
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
    result = subprocess.run([sys.executable, "tools/bench.py", "--only", "nope"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "--only: unknown 'nope'" in result.stderr


def bad_input_refused(argv, monkeypatch, capsys):
    """python tools/bench.py ARGV, in this process, with every section replaced by a recorder: -> (exit status,
    stderr, sections that ran). A usage error must come before any section runs."""
    import bench
    ran = []
    for name in ("bench_op", "bench_train", "bench_inception", "bench_fid"):
        monkeypatch.setattr(bench, name, lambda args, device, name=name: ran.append(name))
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    return exit_info.value.code, capsys.readouterr().err, ran


@pytest.mark.parametrize("argv, words", [
    (["--images", "5"], "--images must be at least 10"),
    (["--only", "fid", "--images", "1"], "--images must be at least 2 for fid"),
    (["--repeats", "0"], "argument --repeats"),
    (["--batch-size", "0"], "argument --batch-size"),
    (["--train-batch-size", "300", "--max-images", "200"], "--train-batch-size 300 is more than the 200 image(s)"),
    (["--workers", "-1"], "argument --workers"),
    (["--workloads", "shapes,foo"], "--workloads: unknown 'foo'"),
    (["--only", "op,foo"], "--only: unknown 'foo'"),  # refused before op runs, not after
    (["--device", "xyz"], "argument --device"),
    (["--device", "meta"], "argument --device"),
    (["--seconds", "nan"], "argument --seconds"),
    (["--seconds", "0"], "argument --seconds"),
    (["--rounds", "0"], "argument --rounds"),
    (["--batch-size", "100000000"], "--batch-size 100000000 needs about"),
    (["--max-images", "100000000"], "--max-images 100000000 and --train-batch-size 128 needs about"),
    (["--images", "100000000"], "--images 100000000 needs about"),
])
def test_bad_input_refused_before_any_work(argv, words, monkeypatch, capsys):
    status, err, ran = bad_input_refused(argv, monkeypatch, capsys)
    assert status == 2 and words in err and "Traceback" not in err and not ran, err


def test_cuda_on_a_cpu_only_torch_refused(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on torch +cpu
    status, err, ran = bad_input_refused(["--device", "cuda"], monkeypatch, capsys)
    assert status == 2 and "--device cuda: this torch sees no CUDA GPU" in err and not ran


def test_anime_folder_smaller_than_a_batch_refused(tmp_path, monkeypatch, capsys):
    from PIL import Image
    Image.new("RGB", (96, 96)).save(tmp_path / "0.jpg")
    os.mkfifo(tmp_path / "1.jpg")  # never opened: it would block the benchmark forever
    argv = ["--only", "train", "--workloads", "anime", "--anime", str(tmp_path), "--train-batch-size", "2"]
    status, err, ran = bad_input_refused(argv, monkeypatch, capsys)
    assert status == 2 and "more than the 1 image(s) of the anime workload" in err and not ran

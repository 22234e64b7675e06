"""The GAN scripts under torchrun (DistributedDataParallel, gloo, CPU processes).

Each test starts `python -m torch.distributed.run` with a small worker script that imports a
model script, optionally injects a fault (a Ctrl-C at a given step, a NaN on one process), and
calls its main(). The oracle for "several processes" is always a run of the same script in
one process: plain python, or torchrun with one process.
"""

import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--max-images", "64", "--batch-size", "16", "--ngf", "8", "--ndf", "8",
        "--log-every", "2", "--augment", "flip", "--diffaug", "color,translation,cutout"]

WORKER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from ganlab import data, training
import {script} as script

# the scripts' tests use a few hundred built-in icons, not the default 20,000
real_load = data.load_images
data.load_images = lambda name, root=None, size=None, **kw: real_load(name, root=root, size=size, n=256)
rank, fault = int(os.environ.get("RANK", "0")), os.environ.get("FAULT", "")
if fault == "ctrl-c":  # the signal reaches process 0 during step 3 and process 1 during step 4
    real_log = training.Run.log
    def log(self, step, epoch, **values):
        if step == (3 if rank == 0 else 4):
            signal.raise_signal(signal.SIGINT)
        return real_log(self, step, epoch, **values)
    training.Run.log = log
if fault == "compile":  # torch.compile's graph capture without inductor's slow C++ build
    import functools, torch
    torch.compile = functools.partial(torch.compile, backend="eager")
if fault == "nan" and rank == 1:  # process 1's images turn NaN from its 6th batch on
    real_warp, calls = script.warp_batch, []
    def warp_batch(*args, **kwargs):
        calls.append(1)
        images = real_warp(*args, **kwargs)
        return images * float("nan") if len(calls) >= 6 else images
    script.warp_batch = warp_batch
script.main(sys.argv[1:])
"""


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, script, flags, processes=2, fault="", launcher=None, wait=True):
    """Run `script` under torchrun with `processes` CPU processes; returns the CompletedProcess
    (or the Popen with wait=False). launcher: extra torchrun flags instead of --standalone."""
    worker = tmp_path / f"worker_{script}.py"
    worker.write_text(WORKER.format(repo=REPO, script=script))
    env = dict(os.environ, FAULT=fault, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    command = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone"]),
               "--nproc-per-node", str(processes), str(worker), *[str(f) for f in flags]]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def ckpt(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def assert_same_run(a, b, buffers=True):
    """Two checkpoints hold the same weights, optimizer moments and curves, bit for bit.
    buffers=False skips BatchNorm's running statistics, which are each process's own under
    torchrun (a checkpoint holds their mean at the time it was written)."""
    assert (a["step"], a["epoch"], a["batch"]) == (b["step"], b["epoch"], b["batch"])
    for key in ["G", "D", "G_ema"]:
        for name, value in (a[key] or {}).items():
            if buffers or "running" not in name:
                assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
    for opt in ["opt_g", "opt_d"]:
        for p, moments in a[opt]["state"].items():
            for name, value in moments.items():
                assert torch.equal(value, b[opt]["state"][p][name]), f"{opt} {name} differs"
    assert torch.equal(a["curves"]["values"], b["curves"]["values"])


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """dcgan.py, 2 processes, 2 epochs of 4 steps: the run the resumed ones must equal."""
    tmp = tmp_path_factory.mktemp("straight")
    result = ok(torchrun(tmp, "dcgan", TINY + ["--epochs", 2, "--out", tmp / "run"]))
    return str(tmp / "run"), result


def test_two_processes_write_one_set_of_outputs(straight):
    folder, result = straight
    state = ckpt(folder)
    assert (state["step"], state["epoch"]) == (8, 2)  # --batch-size is global: 64 / 16 steps an epoch
    assert sorted(os.listdir(os.path.join(folder, "grids"))) == ["epoch-0001-step-4.png", "epoch-0002-step-8.png"]
    assert len(open(os.path.join(folder, "curves.csv")).read().split()) == 1 + 8
    assert result.stdout.count("epoch 2/2") == 1  # printed by process 0 only
    assert [f for _, _, files in os.walk(folder) for f in files if f.endswith(".tmp")] == []


def plain(tmp_path, script, flags):
    """The same worker with plain python: one process, no torchrun."""
    worker = tmp_path / f"worker_{script}.py"
    worker.write_text(WORKER.format(repo=REPO, script=script))
    return subprocess.run([sys.executable, str(worker), *[str(f) for f in flags]], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)


def test_one_process_under_torchrun_equals_plain_python(tmp_path):
    ok(torchrun(tmp_path, "dcgan", TINY + ["--epochs", 1, "--out", tmp_path / "torchrun"], processes=1))
    ok(plain(tmp_path, "dcgan", TINY + ["--epochs", 1, "--out", tmp_path / "plain"]))
    assert_same_run(ckpt(tmp_path / "torchrun"), ckpt(tmp_path / "plain"))


def test_resume_at_an_epoch_boundary_continues_exactly(straight, tmp_path):
    ok(torchrun(tmp_path, "dcgan", TINY + ["--epochs", 1, "--out", tmp_path / "run"]))
    ok(torchrun(tmp_path, "dcgan", ["--device", "cpu", "--resume", tmp_path / "run" / "checkpoint.pt", "--epochs", 2]))
    assert_same_run(ckpt(straight[0]), ckpt(tmp_path / "run"), buffers=False)


def test_ctrl_c_reaching_the_processes_at_different_steps_stops_both_at_one(straight, tmp_path):
    result = torchrun(tmp_path, "dcgan", TINY + ["--epochs", 2, "--out", tmp_path / "run"], fault="ctrl-c")
    assert result.returncode != 0  # a stopped run did not finish: torchrun says so to whoever started it
    state = ckpt(tmp_path / "run")
    # both stop at step 4, the first --log-every step after the later of the two signals
    assert (state["step"], state["epoch"], state["batch"]) == (4, 0, 4)
    assert "continue with: torchrun" in result.stdout
    ok(torchrun(tmp_path, "dcgan", ["--device", "cpu", "--resume", tmp_path / "run" / "checkpoint.pt"]))
    assert_same_run(ckpt(straight[0]), ckpt(tmp_path / "run"), buffers=False)


def test_checkpoints_move_between_one_and_two_processes(straight, tmp_path):
    # a checkpoint of 2 processes continues in one, and that one's in 2 processes again
    ok(plain(tmp_path, "dcgan", ["--resume", os.path.join(straight[0], "checkpoint.pt"), "--epochs", 3,
                                 "--out", tmp_path / "run"]))
    assert ckpt(tmp_path / "run")["step"] == 12
    ok(torchrun(tmp_path, "dcgan", ["--device", "cpu", "--resume", tmp_path / "run" / "checkpoint.pt", "--epochs", 4]))
    assert ckpt(tmp_path / "run")["step"] == 16


def test_two_machines_equal_one_machine_with_two_processes(straight, tmp_path):
    port = free_port()
    launchers = [torchrun(tmp_path, "dcgan", TINY + ["--epochs", 2, "--out", tmp_path / "run"], processes=1,
                          launcher=["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                                    "--master-port", str(port)], wait=False) for node in (0, 1)]
    for launcher in launchers:
        out, err = launcher.communicate(timeout=240)
        assert launcher.returncode == 0, out[-2000:] + err[-2000:]
    assert_same_run(ckpt(straight[0]), ckpt(tmp_path / "run"))


def test_nan_on_one_process_stops_both_at_the_same_step(tmp_path):
    result = torchrun(tmp_path, "dcgan", TINY + ["--epochs", 3, "--out", tmp_path / "run"], fault="nan")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "NaN or infinite at step 6" in output and "checkpoint.pt (step 4)" in output
    assert ckpt(tmp_path / "run")["step"] == 4


@pytest.mark.parametrize("script,flags", [("lsgan", []), ("wgan", ["--gp", 10, "--d-steps", 2])],
                         ids=["lsgan", "wgan-gp"])
def test_the_other_objectives_train_with_two_processes(script, flags, tmp_path):
    ok(torchrun(tmp_path, script, TINY + ["--epochs", 1, "--out", tmp_path / "run", *flags]))
    assert ckpt(tmp_path / "run")["script"] == script  # and every process held the same weights at the save


def test_compile_and_ema_work_with_two_processes(tmp_path):
    ok(torchrun(tmp_path, "dcgan", TINY + ["--epochs", 1, "--compile", "--ema", 0.9, "--out", tmp_path / "run"],
                fault="compile"))
    state = ckpt(tmp_path / "run")
    assert state["step"] == 4 and not any(k.startswith(("_orig_mod.", "module.")) for k in state["D"])
    assert not torch.equal(state["G_ema"]["net.0.weight"], state["G"]["net.0.weight"])


def test_batch_not_divisible_by_the_processes_is_refused(tmp_path):
    result = torchrun(tmp_path, "dcgan", TINY + ["--epochs", 1, "--batch-size", 15, "--out", tmp_path / "run"])
    assert result.returncode != 0 and "give a multiple of 2" in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


CRITIC = """
import contextlib, copy, gc, os, sys
sys.path.insert(0, {repo!r})
import torch, wgan
from ganlab import training

# three WGAN-GP critic updates, penalty included: each process takes half the batch through
# DistributedDataParallel, and process 0 also makes them on its own with the whole batch
run = training.Run(wgan.parser, ["--device", "cpu", "--gp", "10", "--batch-size", "8", "--epochs", "1",
                                 "--out", {out!r}], wgan.__file__, wgan.MUST_MATCH)
torch.manual_seed(0)
D = wgan.Discriminator(16, 8, batchnorm=False)
D.apply(wgan.weights_init)
alone = copy.deepcopy(D)
D_train = run.wrap(D)
optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.9)) for m in (D, alone)]
for step in range(3):
    real, fake = torch.rand(8, 3, 16, 16) * 2 - 1, torch.rand(8, 3, 16, 16) * 2 - 1
    e = torch.rand(8, 1, 1, 1)
    mine = slice(run.rank * 4, (run.rank + 1) * 4)  # this process's rows, as the scripts take them
    for net, wrapped, rows, opt in [(D, D_train, mine, optimizers[0]), (alone, alone, slice(None), optimizers[1])]:
        r, f = real[rows], fake[rows]
        loss = wgan.mean(wrapped(f)) - wgan.mean(wrapped(r))
        loss = loss + 10 * wgan.gradient_penalty(net, r, f, e[rows], contextlib.nullcontext())
        opt.zero_grad()
        loss.backward()
        opt.step()
run._check_in_sync({{"D": D}})  # the processes hold the same weights (else SystemExit)
if run.rank == 0:
    torch.save({{"ddp": D.state_dict(), "alone": alone.state_dict()}}, os.path.join({out!r}, "critic.pt"))
if run.rank == 1:  # now make the processes differ: the check must see it
    with torch.no_grad():
        next(D.parameters())[0].add_(1e-3)
try:
    run._check_in_sync({{"D": D}})
except SystemExit as error:
    print("drift seen:", error, flush=True)
# free the DDP wrapper (and its hold on the gloo group) now, as the scripts do when main() returns:
# left to the interpreter's shutdown, its destructor can abort the process
del D_train
gc.collect()
"""


def test_wgan_gp_critic_update_with_two_halves_equals_one_whole_batch(tmp_path):
    worker = tmp_path / "critic.py"
    worker.write_text(CRITIC.format(repo=REPO, out=str(tmp_path)))
    result = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                str(worker)], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                               text=True, timeout=240))
    state = torch.load(tmp_path / "critic.pt", weights_only=True)
    for name, value in state["alone"].items():
        torch.testing.assert_close(state["ddp"][name], value, rtol=1e-5, atol=1e-6)
    assert result.stdout.count("drift seen") == 2 and "differ between the processes" in result.stdout

"""Mutation testing of the objectives: does the suite notice a wrong loss, target, sign or update?

    python tools/mutants.py                  # every mutant against the tests that should catch it
    python tools/mutants.py 1 4 --all-tests  # two of them, each against every test file named below

Each mutant is one realistic slip in one line (D trained on the wrong labels, the two G losses
swapped, EMA toward the wrong end, ...). For each, the checkout is copied to a temporary folder,
the line is changed there, and pytest runs the test files that cover that script there; a mutant
is "killed" when at least one test fails. The checkout itself is never changed. Without
--all-tests, pytest stops at the first failure (-x) and runs the objective tests first, so a
killed mutant costs seconds.

Measured (2-core CPU, docs/results.md, "Tests that catch a wrong objective"): all 13 killed;
before tests/test_objectives.py and tests/test_toy.py existed, 3 of the 13.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAN_TESTS = ["tests/test_gan_scripts.py", "tests/test_torchrun.py", "tests/test_bad_input_scripts.py"]
VAE_TESTS = ["tests/test_vae.py", "tests/test_bad_input_scripts.py"]
OBJECTIVE_TESTS = ["tests/test_objectives.py", "tests/test_toy.py"]

# number: (file, the exact text, what it becomes, what it breaks, the script's other tests)
MUTANTS = {
    1: ("dcgan.py", "return bce(d_real, 1.0) + bce(d_fake, 0.0)", "return bce(d_real, 0.0) + bce(d_fake, 0.0)",
        "D learns to call the reals fake", GAN_TESTS),
    2: ("dcgan.py", 'bce(d_gen, 1.0) if kind == "non-saturating" else -bce(d_gen, 0.0)',
        '-bce(d_gen, 0.0) if kind == "non-saturating" else bce(d_gen, 1.0)',
        "--g-loss does the opposite of its help", GAN_TESTS),
    3: ("ganlab/training.py", "p_ema.lerp_(p, 1 - d)", "p_ema.lerp_(p, d)",
        "the EMA moves to G by d instead of 1 - d", GAN_TESTS + VAE_TESTS[:1]),
    4: ("lsgan.py", "mse(d_real, B) + mse(d_fake, A)", "mse(d_real, B) + mse(d_fake, B)",
        "LSGAN's D target for fakes is the reals'", GAN_TESTS),
    5: ("lsgan.py", "return self.net(x).flatten()  # (B,)", "return torch.sigmoid(self.net(x).flatten())  # (B,)",
        "a sigmoid on LSGAN's D", GAN_TESTS),
    6: ("wgan.py", "((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()", "(grad.flatten(1).norm(dim=1) ** 2).mean()",
        "the gradient penalty pulls the critic to slope 0", GAN_TESTS),
    7: ("vae.py", "return mu + torch.exp(0.5 * logvar) * eps", "return mu + torch.exp(logvar) * eps",
        "the reparameterization draws with the variance as std", VAE_TESTS),
    8: ("dcgan.py", "d_gen = D_train(diffaug(G_train(z)))", "d_gen = D_train(diffaug(G_train(z).detach()))",
        "G's step has no gradient (a detach in the wrong place)", GAN_TESTS),
    9: ("dcgan.py", "torch.full_like(logits.float(), target))",
        'torch.full_like(logits.float(), target), reduction="sum")', "BCE summed over the batch, not averaged",
        GAN_TESTS),
    10: ("wgan.py", "return mean(d_fake) - mean(d_real)", "return mean(d_real) - mean(d_fake)",
         "the critic's loss with the wrong sign", GAN_TESTS),
    11: ("vae.py", "return per_pixel.flatten(1).sum(dim=1)", "return per_pixel.flatten(1).mean(dim=1)",
         "the reconstruction term averaged over pixels: reweighted against the KL", VAE_TESTS),
    12: ("lsgan.py", "return mse(d_gen, C)", "return mse(d_gen, A)", "LSGAN's G aims at the fakes' target",
         GAN_TESTS),
    13: ("wgan.py", "clip_weights(D, args.clip)", "clip_weights(G, args.clip)", "WGAN clips G instead of the critic",
         GAN_TESTS),
}


def check_patterns():
    """Each mutant's text occurs exactly once in today's code: -> the list of those that do not."""
    wrong = []
    for number, (path, old, _, _, _) in MUTANTS.items():
        with open(os.path.join(REPO, path)) as f:
            if f.read().count(old) != 1:
                wrong.append(f"mutant {number}: {old!r} is not exactly once in {path}")
    return wrong


def run_mutant(number, all_tests):
    path, old, new, _, tests = MUTANTS[number]
    with tempfile.TemporaryDirectory() as scratch:
        copy = os.path.join(scratch, "checkout")
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "out", "data", "__pycache__", "*.egg-info"))
        with open(os.path.join(copy, path)) as f:
            text = f.read()
        with open(os.path.join(copy, path), "w") as f:
            f.write(text.replace(old, new))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + ([] if all_tests else ["-x"])
        command += OBJECTIVE_TESTS + tests
        started = time.time()
        result = subprocess.run(command, cwd=copy, capture_output=True, text=True)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in result.stdout.splitlines()
              if line.startswith("FAILED")]
    return result.returncode != 0, failed, time.time() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mutants", nargs="*", type=int, help="their numbers (default: all)")
    parser.add_argument("--all-tests", action="store_true", help="run every test file (no -x): list what fails")
    args = parser.parse_args(argv)
    unknown = [n for n in args.mutants if n not in MUTANTS]
    if unknown:
        parser.error(f"no mutant {unknown}: they are numbered 1 to {len(MUTANTS)}")
    wrong = check_patterns()
    if wrong:
        parser.error("the code moved under these mutants; update MUTANTS: " + "; ".join(wrong))
    killed = 0
    for number in args.mutants or MUTANTS:
        dead, failed, seconds = run_mutant(number, args.all_tests)
        killed += dead
        print(f"{number:2d} {MUTANTS[number][0]:20s} {'killed' if dead else 'SURVIVED':8s} {seconds:5.0f} s  "
              f"{MUTANTS[number][3]}" + (f"\n     failed: {', '.join(failed)}" if failed else ""), flush=True)
    print(f"{killed} of {len(args.mutants or MUTANTS)} mutants killed")
    return 0 if killed == len(args.mutants or MUTANTS) else 1


if __name__ == "__main__":
    sys.exit(main())

"""One command that checks the GPU path: build, CUDA tests, compute-sanitizer, bench.py, dcgan.py.

    python tests/gpu_check.py --faces ../shared/data/anime-faces     # a CUDA machine: <= 8 min, no network
    python tests/gpu_check.py --faces FOLDER --out DIR --budget 470  # the report in DIR/report.md
    python tests/gpu_check.py                                        # CPU only: GPU steps skipped, exit 0

When a GPU is lent, time on it is short; this script spends it on everything that has to be
seen on a GPU, in one call. Each step has its own time limit, all of them fit in --budget
seconds (a step that would start with less than MIN_STEP_SECONDS left is skipped, saying
so), and a step that fails or runs out of time never stops the later ones:

  environment      GPU, driver, torch, torch's CUDA, nvcc, compute-sanitizer, CPU cores
  flags            the flags the later steps pass still exist in dcgan.py and bench.py
  build            csrc/ JIT-built from an empty extension cache; which kernels loaded
  cuda-tests       pytest tests/test_fused_op.py -k test_cuda_ (a skip counts as a failure)
  memcheck         compute-sanitizer --tool memcheck over the op's CUDA tests, with PyTorch's
                   caching allocator off (an overrun inside a cached block is otherwise unseen)
  racecheck        compute-sanitizer --tool racecheck over the DiffAugment tests (shared-memory
                   hazards of the block reduction; warp_batch uses no shared memory)
  bench-op         python tools/bench.py --only op: fused vs chain vs Pillow, and the copy-bandwidth floor
  dcgan            dcgan.py at 64x64 on the first --faces-images faces of --faces, eager
  dcgan-compile    the same with --compile
  dcgan-torchrun   the same under torchrun with one process
  bench-train      python tools/bench.py --only train (shapes, and the same faces)
  bench-inception  python tools/bench.py --only inception
  bench-fid        python tools/bench.py --only fid on --fid-images PNGs (default 50,000): FID end to end,
                   pytorch-fid's pipeline against inception_score.py's (real weights if installed)

On a machine without a CUDA GPU every GPU step is skipped with that reason, and the script
exits 0 (tests/test_gpu_check.py runs it so, so that it does not rot).

Writes --out/report.md (rewritten after every step, so a run cut short still leaves one):
the versions, one row per step (passed / failed / skipped, seconds, why), then each step's
command and the last lines of its output (bench.py's tables in full); each step's whole
output is in --out/logs/. The extension cache, the decoded-image cache and the runs' outputs
go to --out/work/, deleted at the end unless --keep. Exit status: 0 when no step failed, 1
when one did, 2 for bad arguments.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_STEP_SECONDS = 20  # a step that would get less than this is skipped, not started
TAIL_LINES = 40  # lines of a step's output quoted in the report (bench.py's output: all)


@dataclass
class Step:
    name: str
    timeout: float  # seconds, at most; the budget left may cut it shorter
    command: list = None  # run in REPO with env; or
    function: object = None  # called with (context), returns (status, why, output)
    needs_gpu: bool = True
    needs: str = None  # the name of a context entry that must be set (e.g. "faces"), else skipped
    judge: object = None  # (returncode, output) -> (status, why); default: passed iff returncode 0
    env: dict = field(default_factory=dict)
    quote_all: bool = False  # quote the whole output in the report (bench tables)


@dataclass
class Result:
    name: str
    status: str  # passed, failed, skipped
    why: str
    seconds: float
    command: str = ""
    output: str = ""
    quote_all: bool = False


# --------------------------------------------------------------------------- running steps

def run_command(command, env, timeout, log_path):
    """Run `command` in REPO with its output to log_path; kill its whole process group when
    `timeout` seconds pass (pytest, torchrun and compute-sanitizer start children).
    Returns (returncode or None when it timed out, output)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    with open(log_path, errors="replace") as log:
        return returncode, log.read()


def run_steps(steps, context, budget, report_path=None, header=""):
    """Run the steps in order within `budget` seconds; returns their Results. A failing or
    timed-out step is recorded and the next one runs."""
    deadline = time.monotonic() + budget
    results = []
    logs = os.path.join(context["out"], "logs")
    os.makedirs(logs, exist_ok=True)
    for step in steps:
        left = deadline - time.monotonic()
        if step.needs_gpu and not context["gpu"]:
            results.append(Result(step.name, "skipped", context["no_gpu_reason"], 0.0))
        elif step.needs and not context.get(step.needs):
            results.append(Result(step.name, "skipped", context.get(f"{step.needs}_missing", f"no {step.needs}"), 0.0))
        elif left < MIN_STEP_SECONDS:
            results.append(Result(step.name, "skipped", f"the --budget of {budget:.0f} s is spent "
                                                        f"({max(left, 0):.0f} s left)", 0.0))
        else:
            timeout = min(step.timeout, left)
            started = time.monotonic()
            if step.function is not None:
                try:
                    status, why, output = step.function(context)
                except Exception as error:  # a bug in a check must not stop the others
                    status, why, output = "failed", f"{type(error).__name__}: {error}", ""
                command = f"(in-process check: {step.function.__name__})"
            else:
                env = dict(context["env"], **step.env)
                returncode, output = run_command(step.command, env, timeout, os.path.join(logs, f"{step.name}.log"))
                # a -c program is shown by its name here, not quoted whole
                command = " ".join(PROGRAM_NAMES.get(part, part) for part in step.command)
                if returncode is None:
                    status, why = "failed", f"timed out after {timeout:.0f} s"
                elif step.judge is not None:
                    status, why = step.judge(returncode, output)
                else:
                    status, why = ("passed", "") if returncode == 0 else ("failed", f"exit status {returncode}")
            results.append(Result(step.name, status, why, time.monotonic() - started, command, output,
                                  step.quote_all))
        print(f"gpu_check: {results[-1].name}: {results[-1].status}"
              f"{' (' + results[-1].why + ')' if results[-1].why else ''} [{results[-1].seconds:.0f} s]", flush=True)
        if report_path:
            write_report(report_path, header, results)
    return results


def write_report(path, header, results):
    """The Markdown report, written whole to a scratch file and renamed into place."""
    lines = [header, "", "| step | result | seconds | why |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.why.replace('|', '/')} |")
    for r in results:
        if not r.command:
            continue
        output = r.output.rstrip().splitlines()
        shown = output if r.quote_all else output[-TAIL_LINES:]
        lines += ["", f"## {r.name}: {r.status}", "", f"    {r.command}", "",
                  f"Output ({'all' if len(shown) == len(output) else f'last {len(shown)} of {len(output)}'} lines):",
                  "", "```", *shown, "```"]
    scratch = f"{path}.tmp"
    with open(scratch, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(scratch, path)


# --------------------------------------------------------------------------- judging outputs

def judge_pytest(returncode, output):
    """Passed only if pytest passed and skipped nothing: on a GPU every CUDA test must run."""
    summary = [line for line in output.splitlines() if " in " in line and ("passed" in line or "failed" in line
                                                                              or "error" in line)]
    last = summary[-1].strip("= ") if summary else "no pytest summary line"
    if returncode != 0:
        return "failed", f"exit status {returncode}: {last}"
    if "skipped" in last:
        return "failed", f"{last} (no skip is expected on a GPU: see the -rs lines)"
    return "passed", last


def judge_sanitizer(returncode, output):
    """compute-sanitizer prints "ERROR SUMMARY: N errors" per process (racecheck also
    "RACECHECK SUMMARY: N hazards displayed"); every N must be 0 and pytest must pass."""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", output)]
    hazards = [int(n) for n in re.findall(r"RACECHECK SUMMARY: (\d+) hazard", output)]
    status, why = judge_pytest(returncode, output)
    if not errors:
        return "failed", f"no 'ERROR SUMMARY' line from compute-sanitizer; {why}"
    found = f"{sum(errors)} errors" + (f", {sum(hazards)} hazards" if hazards else "")
    if sum(errors) or sum(hazards) or status != "passed":
        return "failed", f"{found}; {why}"
    return "passed", f"{found}; {why}"


def judge_build(returncode, output):
    kernels = [line for line in output.splitlines() if line.startswith("kernels:")]
    if returncode != 0:
        return "failed", f"exit status {returncode}: {kernels[-1] if kernels else 'see the output'}"
    return "passed", " ".join(line for line in output.splitlines() if line.startswith(("kernels:", "build:")))


# --------------------------------------------------------------------------- the steps

BUILD = r"""
import glob, os, time, warnings
import torch
prebuilt = glob.glob("_ganlab_C*.so")
if prebuilt:
    raise SystemExit(f"kernels: not built: {prebuilt[0]} (setup.py build_ext) would be loaded instead of the "
                     "JIT build: move it away and run again")
start = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from ganlab import fused_op
    loaded = fused_op.load_extension()
seconds = time.monotonic() - start
for w in caught:
    print(f"warning: {w.message}")
devices = sorted(fused_op._state["kernel_devices"])
arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or (
    "sm_%d%d (this GPU)" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "no GPU")
print(f"build: {seconds:.0f} s from an empty cache ({os.environ['TORCH_EXTENSIONS_DIR']}), for {arch}")
print(f"kernels: {', '.join(devices) if loaded else 'none (pure-PyTorch reference)'}")
if "cuda" not in devices:
    raise SystemExit("kernels: the CUDA kernels did not load (the warning above says why)")
"""

ENVIRONMENT = r"""
import os, platform, shutil, subprocess, sys
import torch
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"({error})"
print(f"python {platform.python_version()}, torch {torch.__version__}, torch's CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPU cores")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    print("driver: " + run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
else:
    print("GPU: none (torch.cuda.is_available() is False)")
nvcc = shutil.which("nvcc")
release = [line for line in run([nvcc, "--version"]).splitlines() if "release" in line] if nvcc else []
print(f"nvcc: {nvcc}, {release[-1] if release else 'version unknown'}" if nvcc else "nvcc: not on PATH")
print(f"compute-sanitizer: {sys.argv[1]}")
# what the steps import or run besides torch (setup.py's install_requires and the test extra)
import importlib, importlib.metadata
found = []
for module, package in [("ninja", "ninja"), ("pytest", "pytest"), ("scipy", "scipy"), ("numpy", "numpy"),
                        ("PIL", "pillow"), ("h5py", "h5py"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib")]:
    try:
        importlib.import_module(module)
        found.append(f"{package} {importlib.metadata.version(package)}")
    except Exception as error:
        found.append(f"{package} MISSING ({type(error).__name__})")
print("packages: " + ", ".join(found))
if any("MISSING" in item for item in found):
    raise SystemExit("environment: a package the steps need is missing: pip install -e '.[test]'")
"""

PROGRAM_NAMES = {ENVIRONMENT: "\"$ENVIRONMENT (tests/gpu_check.py)\"", BUILD: "\"$BUILD (tests/gpu_check.py)\""}

# the op's CUDA tests that launch its kernels (the sanitizers' subjects; gradcheck and
# torch.compile launch the same kernels thousands of times, which under a sanitizer is minutes)
KERNEL_TESTS = "test_cuda_warp_equals_cpu_and_grid_sample or test_cuda_diffaug_equals_cpu or test_cuda_bad_index"


def check_flags(context):
    """The flags the dcgan and bench steps pass must exist: read from the scripts' parsers."""
    sys.path[:0] = [REPO, os.path.join(REPO, "tools")]
    import bench
    import dcgan

    missing = []
    for script, parser, command in [("dcgan.py", dcgan.parser, context["dcgan_command"]),
                                    ("bench.py", bench.parser, context["bench_flags"])]:
        known = set(parser._option_string_actions)
        missing += [f"{script} {flag}" for flag in command if flag.startswith("--") and flag not in known]
    if missing:
        return "failed", "flags that no longer exist: " + ", ".join(missing), ""
    return "passed", "", ""


def subset_of_faces(folder, count, work):
    """The first `count` images of `folder` (numeric order: 0.jpg, 1.jpg, ...), copied into
    work/faces-<count>: dcgan.py decodes a whole folder before --max-images cuts it, and 33,431
    faces would cost more seconds than the runs."""
    names = [name for name in os.listdir(folder) if name.lower().endswith((".jpg", ".jpeg", ".png"))]
    names.sort(key=lambda name: (0, int(os.path.splitext(name)[0]), "") if os.path.splitext(name)[0].isdigit()
               else (1, 0, name))
    subset = os.path.join(work, f"faces-{count}")
    os.makedirs(subset, exist_ok=True)
    for name in names[:count]:
        shutil.copyfile(os.path.join(folder, name), os.path.join(subset, name))
    return subset, min(count, len(names))


def sanitizer_path():
    """compute-sanitizer on PATH, else in the CUDA toolkit nvcc belongs to, else from pip's
    nvidia-cuda-sanitizer-api wheel (under site-packages/nvidia/); None if none is found."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in homes:
        candidate = home and os.path.join(home, "bin", "compute-sanitizer")
        if candidate and os.path.isfile(candidate):
            return candidate
    import importlib.util  # pip's wheel, last

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for folder, _, names in os.walk(root):
            if "compute-sanitizer" in names and os.access(os.path.join(folder, "compute-sanitizer"), os.X_OK):
                return os.path.join(folder, "compute-sanitizer")
    return None


def make_steps(args, context):
    python = sys.executable
    work = context["work"]
    pytest = [python, "-m", "pytest", "tests/test_fused_op.py", "-q", "-rs", "-p", "no:cacheprovider"]
    sanitizer = context.get("sanitizer") or "compute-sanitizer"
    # PyTorch's caching allocator hands out pieces of big blocks: an overrun into the next
    # piece is not outside an allocation, so memcheck would not see it. Off, every tensor is
    # its own cudaMalloc.
    no_caching = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    dcgan_flags = ["--data", context.get("faces_subset") or "FACES", "--image-size", "64",
                   "--max-images", str(args.faces_images), "--epochs", str(args.epochs), "--batch-size", "128",
                   "--device", "cuda", "--sample", "64"]
    context["dcgan_command"] = dcgan_flags + ["--compile", "--out"]
    bench_common = ["--device", "cuda", "--seconds", "1", "--rounds", "3"]
    context["bench_flags"] = bench_common + ["--only", "--workloads", "--anime", "--max-images", "--images",
                                             "--repeats"]
    return [
        Step("environment", 60, [python, "-c", ENVIRONMENT, context.get("sanitizer") or "not found"],
             needs_gpu=False),
        Step("flags", 60, function=check_flags, needs_gpu=False),
        Step("build", 240, [python, "-c", BUILD], judge=judge_build),
        Step("cuda-tests", 180, pytest + ["-k", "test_cuda_"], judge=judge_pytest),
        Step("memcheck", 150, [sanitizer, "--tool", "memcheck", "--target-processes", "all", *pytest,
                               "-k", KERNEL_TESTS], needs="sanitizer", judge=judge_sanitizer, env=no_caching),
        Step("racecheck", 120, [sanitizer, "--tool", "racecheck", "--target-processes", "all", *pytest,
                                "-k", "test_cuda_diffaug_equals_cpu"], needs="sanitizer", judge=judge_sanitizer,
             env=no_caching),
        Step("bench-op", 120, [python, "tools/bench.py", "--only", "op", *bench_common], quote_all=True),
        Step("dcgan", 120, [python, "dcgan.py", *dcgan_flags, "--out", os.path.join(work, "dcgan-eager")],
             needs="faces_subset"),
        Step("dcgan-compile", 180, [python, "dcgan.py", *dcgan_flags, "--compile",
                                    "--out", os.path.join(work, "dcgan-compile")], needs="faces_subset"),
        Step("dcgan-torchrun", 120, [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                     "dcgan.py", *dcgan_flags, "--out", os.path.join(work, "dcgan-torchrun")],
             needs="faces_subset"),
        Step("bench-train", 150, [python, "tools/bench.py", "--only", "train", *bench_common, "--workloads",
                                  "shapes,anime" if context.get("faces_subset") else "shapes",
                                  "--anime", context.get("faces_subset") or "FACES",
                                  "--max-images", str(args.faces_images)], quote_all=True),
        Step("bench-inception", 120, [python, "tools/bench.py", "--only", "inception", "--device", "cuda",
                                      "--images", "1000", "--repeats", "1"], quote_all=True),
        # last: it is the longest, and the budget skips it (saying so) when the steps before took their time
        Step("bench-fid", 240, [python, "tools/bench.py", "--only", "fid", "--device", "cuda",
                                "--images", str(args.fid_images), "--repeats", "1"], quote_all=True),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--faces", default=None, metavar="FOLDER",
                        help="folder of real face images (e.g. ../shared/data/anime-faces) for the dcgan.py runs "
                             "and bench.py's train section; without it those runs are skipped")
    parser.add_argument("--faces-images", type=int, default=4096, help="how many of those faces to train on")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each dcgan.py run")
    parser.add_argument("--fid-images", type=int, default=50000, help="PNGs the bench-fid step scores")
    parser.add_argument("--out", default="gpu-check", help="folder for report.md, logs/ and work/")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all the steps together")
    parser.add_argument("--keep", action="store_true", help="keep --out/work/ (caches, the runs' outputs)")
    parser.add_argument("--only", default=None, metavar="STEPS",
                        help="comma-separated steps to run (e.g. build,cuda-tests to split the check over two calls); "
                             "the others are reported as skipped")
    args = parser.parse_args(argv)
    if args.faces is not None and not os.path.isdir(args.faces):
        parser.error(f"--faces {args.faces}: no such folder; give a folder of face images, e.g. "
                     "../shared/data/anime-faces")
    if args.faces_images < 128 or args.epochs < 1 or args.fid_images < 2 or args.budget < MIN_STEP_SECONDS:
        parser.error(f"--faces-images must be >= 128 (one batch), --epochs >= 1, --fid-images >= 2 (a covariance), "
                     f"--budget >= {MIN_STEP_SECONDS}")
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    import torch

    gpu = torch.cuda.is_available()
    context = {"out": out, "work": work, "gpu": gpu,
               "no_gpu_reason": f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)",
               "sanitizer": sanitizer_path(),
               "sanitizer_missing": "compute-sanitizer not found (PATH, nvcc's CUDA toolkit, /usr/local/cuda, "
                                    "pip's nvidia-cuda-sanitizer-api)",
               "faces_subset_missing": "no --faces FOLDER given"}
    if args.faces is not None:
        subset, count = subset_of_faces(args.faces, args.faces_images, work)
        if count < 128:
            parser.error(f"--faces {args.faces}: {count} images found, at least 128 (one batch) are needed")
        context["faces_subset"] = subset
    # one extension cache and one decoded-image cache for every step: the build step fills
    # the first from empty, the others reuse it
    context["env"] = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.join(work, "torch_extensions"),
                          GANLAB_CACHE=os.path.join(work, "data_cache"), PYTHONUNBUFFERED="1")
    steps = make_steps(args, context)
    if args.only is not None:
        chosen = set(args.only.split(","))
        unknown = chosen - {step.name for step in steps}
        if unknown:
            parser.error(f"--only: unknown steps {sorted(unknown)}; the steps are {', '.join(s.name for s in steps)}")
        context["not_chosen_missing"] = f"not in --only {args.only}"
        for step in steps:
            if step.name not in chosen:
                step.needs = "not_chosen"
    header = (f"# GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n"
              f"`python tests/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
              f"(budget {args.budget:.0f} s); versions: the environment step below")
    report = os.path.join(out, "report.md")
    results = run_steps(steps, context, args.budget, report, header)
    environment = next((r.output.strip() for r in results if r.name == "environment" and r.output), "")
    header += "\n\n" + "\n".join(f"    {line}" for line in environment.splitlines())
    write_report(report, header, results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r.name for r in results if r.status == "failed"]
    print(f"gpu_check: report in {report}; "
          f"{sum(r.status == 'passed' for r in results)} passed, {len(failed)} failed, "
          f"{sum(r.status == 'skipped' for r in results)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

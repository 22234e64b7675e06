"""Compile the CUDA side of csrc/ against the headers of a given torch, on a machine without a GPU.

The README promises torch >= 2.4. A CUDA machine with an older torch than the developer's
JIT-builds csrc/augment_cuda.cpp against *its* headers, so an API that only newer torch has
(c10::Stream::native_handle() first exists in 2.11) breaks the CUDA build there while every
test here passes. This script compiles, with the C++ standard, defines and include folders of
torch's JIT build, the CUDA host file (g++ -fsyntax-only) and the kernels (nvcc -c for sm_90
with torch's nvcc flags) against the headers of the oldest supported torch and of the
installed one, and the CPU file (g++ -fsyntax-only) against the old headers (the installed
torch JIT-builds it anyway):

    python tests/compile_cuda_headers.py                    # torch 2.4.0 (fetched once) and the installed torch
    python tests/compile_cuda_headers.py --torch 2.4.0      # one version only; 'installed' for the installed one
    python tests/compile_cuda_headers.py --fetch-only       # only fetch the headers (CI does this before pytest)

Prints one line per file and version ("ok" or the compiler's last lines) and exits 1 if any
failed. tests/test_fused_op.py runs the same checks (test_sources_compile_against_torch).

Where the old headers come from: PyPI's Linux wheel of torch 2.4.0 is the CUDA build (about
800 MB; there is no CPU-only wheel on PyPI for that version). `pip download --no-deps` fetches
it once, only torch/include/ (8,606 files, 28 MB, the CUDA headers of c10/cuda and ATen/cuda
included; 51 MB on disk) and torch/utils/cpp_extension.py are extracted into
~/.cache/ganlab-ci/torch-<version>/, and the wheel is deleted; later runs use the cache.
Measured here: 9 s to download, 2-13 s to extract. GANLAB_CI_CACHE overrides the cache folder.

The installed CPU wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h (it
only sets the Windows export macro C10_CUDA_BUILD_SHARED_LIBS). c10/cuda/CUDAMacros.h skips
it when C10_CUDA_NO_CMAKE_CONFIGURE_FILE is defined, which changes nothing on Linux, so for
headers without that file the check defines it; the CUDA wheel of 2.4.0 has the real file.
"""

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
OLDEST_TORCH = "2.4.0"  # the minimum stated in README.md and setup.py
CACHE = os.environ.get("GANLAB_CI_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ganlab-ci"))


# what is kept from a wheel: the headers, and the JIT builder (it names the C++ standard)
KEPT = ("torch/include/", "torch/utils/cpp_extension.py")


def cached_include_dir(version):
    """Where the headers of torch `version` live once fetched (None if they are not there yet)."""
    root = os.path.join(CACHE, f"torch-{version}")
    complete = all(os.path.exists(os.path.join(root, kept[len("torch/"):])) for kept in KEPT)
    return os.path.join(root, "include") if complete else None


def fetch_torch_headers(version, log=print):
    """Download torch `version`'s Linux wheel with pip (no dependencies), keep only its
    torch/include/ under the cache, delete the wheel. Returns the include folder."""
    include = cached_include_dir(version)
    if include:
        return include
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        started = time.monotonic()
        # the headers are the same for every Python version: ask for one that torch 2.4 has
        # a wheel for, whatever Python runs this
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir",
                   "--only-binary=:all:", "--platform", "manylinux1_x86_64", "--platform",
                   "manylinux_2_28_x86_64", "--python-version", "3.11", "-d", scratch, f"torch=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download of torch=={version} failed:\n{result.stderr[-2000:]}")
        (wheel,) = [os.path.join(scratch, name) for name in os.listdir(scratch) if name.endswith(".whl")]
        wheel_bytes = os.path.getsize(wheel)
        downloaded = time.monotonic()
        # extract torch/include/ into a scratch folder, then rename it into place: a run
        # stopped half-way leaves no half-filled cache behind
        extracted = os.path.join(scratch, "extracted")
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(KEPT) and not m.endswith("/")]
            for member in members:
                archive.extract(member, extracted)
        os.remove(wheel)
        target = os.path.join(CACHE, f"torch-{version}")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(os.path.join(extracted, "torch"), target)
        include_bytes = sum(os.path.getsize(os.path.join(folder, name))
                            for folder, _, names in os.walk(target) for name in names)
        log(f"fetched torch {version}: wheel {wheel_bytes / 1e6:.0f} MB downloaded in "
            f"{downloaded - started:.0f} s; kept torch/include/ and cpp_extension.py ({len(members)} files, "
            f"{include_bytes / 1e6:.0f} MB) in {target}, extracted in {time.monotonic() - downloaded:.0f} s")
    return cached_include_dir(version)


def cuda_home():
    """The CUDA toolkit whose headers the host file needs: found as torch's JIT build finds it
    (CUDA_HOME, else the folder above nvcc's bin/, else /usr/local/cuda), which a CPU build of
    torch does not do for us. None if none of them has the CUDA runtime's headers."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def installed_torch_dirs():
    """The installed torch's include folder and its cpp_extension.py."""
    import torch

    root = os.path.dirname(torch.__file__)
    return os.path.join(root, "include"), os.path.join(root, "utils", "cpp_extension.py")


def cxx_standard(cpp_extension_source):
    """The -std torch's JIT build passes, read from that torch's own cpp_extension.py."""
    with open(cpp_extension_source) as f:
        text = f.read()
    return "c++20" if "-std=c++20" in text else "c++17"


def compile_commands(include, standard, scratch, cpu_file=True):
    """(label, command) for each source file: the CUDA host file and (cpu_file) the CPU file
    with g++ (syntax only: the point is which declarations exist), the kernels with nvcc."""
    from torch.utils import cpp_extension

    cuda = cuda_home()
    # the include folders and defines of torch's JIT build (cpp_extension.include_paths,
    # -DTORCH_API_INCLUDE_EXTENSION_H, -DTORCH_EXTENSION_NAME); the ABI define is left out,
    # as it changes no declaration
    includes = ["-I" + include, "-I" + os.path.join(include, "torch", "csrc", "api", "include"),
                "-I" + sysconfig.get_paths()["include"]]
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=ganlab_ops_cuda"]
    if not os.path.exists(os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel: see the docstring
    cxx = [os.environ.get("CXX", "c++"), f"-std={standard}", "-fsyntax-only", *includes, *defines]
    commands = [
        ("augment_cuda.cpp (g++)",
         cxx + ["-I" + os.path.join(cuda, "include"), os.path.join(CSRC, "augment_cuda.cpp")]),
        ("augment_kernels.cu (nvcc)", [os.path.join(cuda, "bin", "nvcc"), f"-std={standard}", "-O3", "-c",
                                       *includes, *cpp_extension.COMMON_NVCC_FLAGS,
                                       "-gencode=arch=compute_90,code=sm_90", os.path.join(CSRC, "augment_kernels.cu"),
                                       "-o", os.path.join(scratch, "augment_kernels.o")]),
    ]
    if cpu_file:
        commands.append(("augment.cpp (g++)", cxx + ["-fopenmp", os.path.join(CSRC, "augment.cpp")]))
    return commands


def compile_against(include, standard, cpu_file=True):
    """Compile the files against the headers in `include`, at the same time (they are
    independent). Returns [(label, ok, last lines of the compiler's output)]."""
    with tempfile.TemporaryDirectory() as scratch:
        commands = compile_commands(include, standard, scratch, cpu_file)
        running = [(label, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                   for label, command in commands]
        results = []
        for label, process in running:
            output, _ = process.communicate()
            # a warning is a failure too: the kernels are warning-free and should stay so
            ok = process.returncode == 0 and "warning" not in output.lower()
            results.append((label, ok, "\n".join(output.strip().splitlines()[-15:])))
    return results


def check(version):
    """Compile against torch `version` ("installed" for the one this Python imports);
    returns [(label, ok, output)]. Fetches the headers of a version not yet cached. The CPU
    file is checked against other versions only: the installed torch JIT-builds it anyway."""
    if version == "installed":
        include, source = installed_torch_dirs()
    else:
        include = fetch_torch_headers(version)
        source = os.path.join(os.path.dirname(include), "utils", "cpp_extension.py")
    return compile_against(include, cxx_standard(source), cpu_file=version != "installed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", action="append", metavar="VERSION",
                        help=f"a torch version to compile against, or 'installed' (repeatable; "
                             f"default: {OLDEST_TORCH} and installed)")
    parser.add_argument("--fetch-only", action="store_true", help="fetch the headers into the cache, compile nothing")
    args = parser.parse_args()
    versions = args.torch or [OLDEST_TORCH, "installed"]
    if args.fetch_only:
        for version in versions:
            if version != "installed":
                print(f"torch {version}: headers in {fetch_torch_headers(version)}")
        return
    if cuda_home() is None:
        parser.error("no CUDA toolkit found (CUDA_HOME, nvcc on PATH or /usr/local/cuda): the CUDA files "
                     "need its headers")
    failed = False
    for version in versions:
        for label, ok, output in check(version):
            print(f"torch {version}: {label}: {'ok' if ok else 'FAILED'}")
            if not ok:
                failed = True
                print("    " + output.replace("\n", "\n    "))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

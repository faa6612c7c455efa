"""genfast: fused GPU kernels for VAEs, WGAN-GP and DDPM diffusion.

The Triton kernels live in the top-level folder ``kernels/`` of the repository and are installed as
``genfast.kernels``; no top-level module named ``kernels`` is installed.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _extension_build():
    """(ext_modules, cmdclass) for the C++ extension genfast._C, or none when torch is not importable here (pip's
    isolated build of a fresh clone): the first use then compiles the same sources, shipped as genfast/csrc,
    just-in-time (genfast.cpp)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("genfast: torch is not importable at build time; the C++ kernels will be compiled on first use")
        return [], {}
    # genfast/cpp/__init__.py holds the source list and flags shared with the just-in-time build; it is loaded by
    # path because importing the genfast package needs its dependencies.
    spec = importlib.util.spec_from_file_location("_genfast_cpp_build", ROOT / "genfast" / "cpp" / "__init__.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    skip = build.cuda_skip_reason()
    if skip is not None:
        print(f"genfast: building the C++ CPU kernels only, not the CUDA ones: {skip}")
    flags = build.compile_flags()
    # Paths relative to setup.py: setuptools refuses absolute source paths.
    srcs = [os.path.relpath(p, ROOT) for p in build.sources(ROOT, cuda=skip is None)]
    if skip is None:
        # With no GPU to detect, compile for Ampere and Hopper (plus PTX for later GPUs) unless told otherwise.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = cpp_extension.CUDAExtension("genfast._C", srcs, extra_compile_args=flags,
                                          extra_link_args=build.link_flags(),
                                          library_dirs=[str(build.cuda_library_dir())])
    else:
        ext = cpp_extension.CppExtension("genfast._C", srcs, extra_compile_args={"cxx": flags["cxx"]},
                                         extra_link_args=build.link_flags())
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extension_build()

setup(
    name="genfast",
    version="0.1.0",
    description="Fused Triton kernels for training and sampling VAEs, WGAN-GP and DDPM diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ installs as genfast.kernels and bench/ as genfast.bench (the suite behind `genfast bench`); csrc/
    # as genfast/csrc, the sources of the just-in-time build where the wheel was built without the extension.
    packages=find_packages(include=["genfast", "genfast.*"]) + ["genfast.kernels", "genfast.bench", "genfast.csrc"],
    package_dir={"genfast.kernels": "kernels", "genfast.bench": "bench", "genfast.csrc": "csrc"},
    package_data={"genfast.csrc": ["cpu/*.cpp", "cpu/*.h", "cuda/*.cu"]},
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "matplotlib",
        "pillow",
        "torchmetrics",  # FID and KID of genfast eval (with genfast's own feature network: no torch-fidelity)
    ],
    extras_require={
        "diffusers": ["diffusers"],
        "digits": ["scikit-learn"],
        "dev": [
            "pytest",
            "pytest-xdist",
            "pytest-benchmark",
            "hypothesis",
            "scipy",
            "diffusers",
            "scikit-learn",
            "ninja",
            "liger-kernel==0.5.2",  # the static model's calibration kernels (bench/calibration.py)
        ],
    },
    entry_points={"console_scripts": ["genfast = genfast.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)

"""genfast: fused GPU kernels for VAEs, WGAN-GP and DDPM diffusion.

The Triton kernels live in the top-level folder ``kernels/`` of the repository and are installed as
``genfast.kernels``; no top-level module named ``kernels`` is installed.
"""
from setuptools import find_packages, setup

setup(
    name="genfast",
    version="0.1.0",
    description="Fused Triton kernels for training and sampling VAEs, WGAN-GP and DDPM diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ installs as genfast.kernels and bench/ as genfast.bench (the suite behind `genfast bench`).
    packages=find_packages(include=["genfast", "genfast.*"]) + ["genfast.kernels", "genfast.bench"],
    package_dir={"genfast.kernels": "kernels", "genfast.bench": "bench"},
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "matplotlib",
        "pillow",
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
        ],
    },
    entry_points={"console_scripts": ["genfast = genfast.cli:main"]},
)

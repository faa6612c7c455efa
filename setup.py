"""genfast: fused GPU kernels for VAEs, WGAN-GP and DDPM diffusion.

The Triton kernels live in the top-level folder ``kernels/`` of the repository and are installed as
``genfast.kernels``; no top-level module named ``kernels`` is installed.
"""
from setuptools import setup

setup(
    name="genfast",
    version="0.1.0",
    description="Fused Triton kernels for training and sampling VAEs, WGAN-GP and DDPM diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["genfast", "genfast.reference", "genfast.ops", "genfast.kernels"],
    package_dir={"genfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",
            "pytest-benchmark",
            "hypothesis",
            "scipy",
            "diffusers",
        ],
    },
)

"""Build script. The package metadata lives in pyproject.toml; this file exists so the CUDA
extension (csrc/, built as ditfast._C when a CUDA toolkit is present) has a home."""
from setuptools import setup

setup()

"""Only here because cffi's build hook is a setup() keyword; metadata is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])

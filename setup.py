"""Only the optional C decoder of compressed checkpoints; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and ``load_compressed`` decodes
with numpy (same result, ~3x slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fx_sparsify._bitmask", ["fx_sparsify/_bitmask.c"], optional=True,
                             extra_compile_args=["-O3"])])

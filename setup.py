"""Only the optional C kernels (``fx_sparsify/_kernels.c``); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the callers take their torch /
numpy paths (same results, slower: see ``fx_sparsify/_native.py``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fx_sparsify._kernels",
            ["fx_sparsify/_kernels.c"],
            optional=True,
            extra_compile_args=["-O3", "-ffp-contract=off"],
        )
    ]
)

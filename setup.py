"""The one compiled part: the element walk of relaypacsd.dicomfile (relaypacsd/elementwalk.c). Optional: built
without a C compiler, the package falls back to the same walk in Python (slower, same answers)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("relaypacsd._elementwalk", ["relaypacsd/elementwalk.c"], optional=True,
                             extra_compile_args=["-O2"])])

"""Build hooks: generate the protobuf modules before packaging (see build_protos.py),
and compile the handler ABI's hot path (host/_handler.c, a CPython extension)."""

import runpy
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        here = Path(__file__).resolve().parent
        runpy.run_path(str(here / "build_protos.py"))["generate"]()
        super().run()


setup(
    cmdclass={"build_py": BuildWithProtos},
    ext_modules=[
        Extension(
            "layotto.host._handler",
            sources=["host/_handler.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)

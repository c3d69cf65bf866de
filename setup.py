"""Build hook: generate the protobuf modules before packaging (see shim/protocol/build_protos.py)."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        here = Path(__file__).resolve().parent
        runpy.run_path(str(here / "shim" / "protocol" / "build_protos.py"))["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})

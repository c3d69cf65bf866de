"""The ``layotto`` command line: ``layotto host``, ``layotto image ...``."""

from __future__ import annotations

import argparse
import sys

from layotto.host import daemon


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "image":
        from layotto.images import builder

        return builder.main(argv[1:])
    parser = argparse.ArgumentParser(prog="layotto", description="Layotto WebAssembly node host.")
    sub = parser.add_subparsers(dest="command", required=True)
    host = sub.add_parser("host", help="run the node host in the foreground")
    daemon.add_arguments(host)
    sub.add_parser("image", help="build function images (layotto image build --help)")
    args = parser.parse_args(argv)
    if args.command == "host":
        daemon.run(args)
    return 0

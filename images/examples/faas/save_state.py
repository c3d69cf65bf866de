"""Seed a state store through the node host's gRPC Runtime API (Layotto's
``spec.proto.runtime.v1.Runtime``), as ``redis-cli set book1 100`` does in Layotto's FaaS
quickstart, for any store type (the embedded SQLite one included)::

    /opt/layotto/bin/python images/examples/faas/save_state.py state_demo book1 100
    /opt/layotto/bin/python images/examples/faas/save_state.py --get state_demo book1

The API listens on the unix socket ``<containerd state>/layotto/runtime.sock``
(``/run/containerd/layotto/runtime.sock`` for the system containerd; ``--socket``), and on a
TCP address only when the operator configures one (``--address``). Every call carries the
bearer token the node operator provisioned for this app (``runtimeApi.apps`` in
``/etc/layotto/policy.yaml``): read from ``--token-file`` (default
``/etc/layotto/tokens/seeder``) or the ``LAYOTTO_TOKEN`` environment variable. The token
decides the app, hence the key prefix; with the store's ``keyPrefix: none`` (the FaaS
example's) the key is the one the functions read. It needs the Python packages ``grpcio``
and ``layotto`` (the node's layotto virtual environment has both).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from layotto.host.protocol import runtime_api_pb2 as pb

SERVICE = "spec.proto.runtime.v1.Runtime"
DEFAULT_SOCKET = "/run/containerd/layotto/runtime.sock"
DEFAULT_TOKEN_FILE = "/etc/layotto/tokens/seeder"


def call(target: str, token: str, method: str, request: Message, response_type: type[Message]) -> Message:
    """One unary call of the Runtime service (no generated stubs needed)."""
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return rpc(request, timeout=10, metadata=(("authorization", f"Bearer {token}"),))


def save_state(target: str, token: str, store: str, key: str, value: bytes) -> None:
    request = pb.SaveStateRequest(store_name=store, states=[pb.StateItem(key=key, value=value)])
    call(target, token, "SaveState", request, empty_pb2.Empty)


def get_state(target: str, token: str, store: str, key: str) -> bytes:
    request = pb.GetStateRequest(store_name=store, key=key)
    return call(target, token, "GetState", request, pb.GetStateResponse).data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", default=DEFAULT_SOCKET, help=f"unix socket (default {DEFAULT_SOCKET})")
    where.add_argument("--address", help="host:port of the TCP listener instead, e.g. 127.0.0.1:34904")
    parser.add_argument(
        "--token-file", default=DEFAULT_TOKEN_FILE, help=f"this app's token (default {DEFAULT_TOKEN_FILE})"
    )
    parser.add_argument("--get", action="store_true", help="read the key instead (GetState)")
    parser.add_argument("store")
    parser.add_argument("key")
    parser.add_argument("value", nargs="?")
    args = parser.parse_args(argv)
    target = args.address or f"unix://{args.socket}"
    token = os.environ.get("LAYOTTO_TOKEN", "")
    if not token:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            print(f"no token: {exc} (or set LAYOTTO_TOKEN)", file=sys.stderr)
            return 1
    try:
        if args.get:
            sys.stdout.buffer.write(get_state(target, token, args.store, args.key) + b"\n")
            return 0
        if args.value is None:
            parser.error("a value to save is needed (or --get)")
        save_state(target, token, args.store, args.key, args.value.encode())
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"SaveState {args.store} {args.key}={args.value} ({target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

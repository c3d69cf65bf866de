"""The node host's protocols: the gRPC Runtime API (``runtime_api.proto``, Layotto's
``spec.proto.runtime.v1.Runtime``) that sidecar applications call. The ``*_pb2`` modules
are generated at build time (``make proto``)."""

"""The gRPC contract of the daemon: ``fission.proto`` and the stubs generated from it.

``fission_pb2`` (messages, with a ``.pyi``) and ``fission_pb2_grpc`` (stubs and servicer bases)
are made by the build (``make protos``, which ``make venv`` runs) with ``grpc_tools.protoc``;
they are not committed and never edited by hand.
"""

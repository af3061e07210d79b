"""The gRPC contract of the daemon: ``fission.proto`` and the stubs generated from it.

``fission_pb2`` (messages, with a ``.pyi``) and ``fission_pb2_grpc`` (stubs and servicer bases)
are generated with ``grpc_tools.protoc`` and committed, so the package ships with them; they are
never edited by hand. After changing ``fission.proto``, ``make protos`` makes them again (with
the grpcio-tools pinned in ``pyproject.toml``); ``tests/unit/test_packaging.py`` regenerates
them and fails if the committed ones differ. Importing them needs ``fission[server]`` (grpcio,
protobuf); ``run_stream`` needs nothing.
"""

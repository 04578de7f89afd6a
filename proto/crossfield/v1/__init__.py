"""crossfield.v1: the wire API (generated stubs beside their .proto) and numpy helpers.

Generated modules: ``inference_pb2``/``inference_pb2_grpc``, ``admin_pb2``/``admin_pb2_grpc``
and ``relax_pb2``/``relax_pb2_grpc``; regenerate with ``python -m grpc_tools.protoc -Iproto
--python_out=proto --pyi_out=proto --grpc_python_out=proto proto/crossfield/v1/*.proto``.
Nothing here imports torch.
"""

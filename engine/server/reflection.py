"""Server reflection under both names tools ask for: grpc.reflection.v1 (current grpcurl, grpc-js,
Postman try it first) and grpc.reflection.v1alpha (older tools).

grpcio-reflection (1.85) ships only v1alpha. The v1 service is the same proto under another
package (messages and field numbers identical), so the v1alpha servicer answers v1 calls with the
v1alpha message classes; v1's file descriptor is added to the default pool (a renamed copy of
v1alpha's) so a client can also describe the v1 service itself.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return  # a grpcio-reflection that ships v1 (or an earlier call) added it
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = V1_FILE
    fdp.package = "grpc.reflection.v1"
    fdp.ClearField("options")
    pool.AddSerializedFile(fdp.SerializeToString())


def enable_reflection(service_names, server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) listing ``service_names`` and the reflection services."""
    _add_v1_descriptor()
    names = tuple(service_names) + (V1_SERVICE, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)  # v1alpha (its own servicer instance)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    handlers = {"ServerReflectionInfo": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, handlers),))
    server.add_registered_method_handlers(V1_SERVICE, handlers)

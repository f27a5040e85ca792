"""The front's gRPC port: every method of ``inference.GRPCInferenceService`` passed to a
replica unread, as the REST front (distml.serving.front) forwards HTTP requests. The replica
checks the token and the message and counts the call in the shared metrics; the proxy only
chooses the replica (ReplicaSet.pick) and passes on the metadata the replica needs.
"""

from __future__ import annotations

from typing import Any

import grpc

from distml.serving.grpc_service import SERVICE, add_port, server_options
from distml.serving.transport import Tls

_PASSED = ("authorization", "idempotency-key")  # metadata the replicas need


class _Proxy(grpc.GenericRpcHandler):
    """Every method of the service, its bytes passed to a replica unread: to the one with the
    fewest calls in flight, or for an idempotency key always the same live one. The replica
    checks the token and the message, and counts the call in the shared metrics."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            meta = [(k, v) for k, v in context.invocation_metadata() if k in _PASSED]
            replica = self.replicas.pick(dict(meta).get("idempotency-key"))
            if replica is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "no replica is ready; retry "
                                    "shortly")
            replica.inflight += 1
            try:
                return await replica.channel.unary_unary(method)(
                    request, metadata=meta, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
            finally:
                replica.inflight -= 1

        return grpc.unary_unary_rpc_method_handler(forward)


async def start_grpc_proxy(replicas: Any, address: str, settings: Any, tls: Tls | None = None
                           ) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=server_options(settings.max_body_bytes))
    server.add_generic_rpc_handlers((_Proxy(replicas),))
    port = add_port(server, address, tls)
    await server.start()
    return server, port

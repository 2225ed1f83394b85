"""What every gRPC service of the cloud shares: status codes by error type, and binding a port."""
from __future__ import annotations

import grpc

from orchestrator.errors import (
    Busy,
    DataCorrupted,
    InvalidRequest,
    NotFound,
    NotYourKey,
    QuotaExceeded,
    Refused,
    StorageFull,
    StorageUnavailable,
    TooManyStreams,
    WrongState,
)

# The owner's agent acts on the code alone (owners/upload.py): RESOURCE_EXHAUSTED means "no room for
# you until a person acts" (quota, full disk) and is never retried; ABORTED and UNAVAILABLE are
# passing conditions it retries with backoff, such as its own earlier streams still holding a slot.

STATUS_BY_ERROR: dict[type[Refused], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    DataCorrupted: grpc.StatusCode.DATA_LOSS,
    Busy: grpc.StatusCode.ABORTED,
    StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyStreams: grpc.StatusCode.ABORTED,  # one of the owner's streams ends soon (done, idle or superseded)
    NotYourKey: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: Refused) -> grpc.StatusCode:
    """The status of the most specific mapped class in the error's ancestry."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.FAILED_PRECONDITION


def abort(context: grpc.ServicerContext, exc: Refused) -> None:
    """End the call with the status that ``exc``'s type maps to (raises, as context.abort does)."""
    context.abort(status_for(exc), str(exc))


def bind(server: grpc.Server, listen: str, tls, what: str) -> int:
    """Add the listening port, with TLS (and client certificates when ``tls.client_ca``) if given."""
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        creds = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        port = server.add_secure_port(listen, creds)
    if port == 0:
        raise OSError(f"{what}: cannot listen on {listen} (address in use?)")
    return port

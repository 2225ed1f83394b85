"""Owner authentication for the gRPC services: a bearer token per owner, only its hash known here."""
from __future__ import annotations

import hashlib
import hmac
import logging

import grpc

log = logging.getLogger("orchestrator.auth")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenAuth:
    def __init__(self, owner_token_hashes: dict[str, str]) -> None:
        self._owners = dict(owner_token_hashes)  # owner id -> sha256(token) hex

    def owner(self, context: grpc.ServicerContext) -> str:
        """The caller's owner id, or abort the call with UNAUTHENTICATED."""
        auth = dict(context.invocation_metadata()).get("authorization", "")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing token (authorization: Bearer ...)")
        presented = token_sha256(auth[len("Bearer "):])
        owner = None
        for owner_id, expected in self._owners.items():  # compare every entry: no early-exit timing
            if hmac.compare_digest(presented, expected):
                owner = owner_id
        if owner is None:
            log.warning("rejected a call with an unknown token from %s", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return owner


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

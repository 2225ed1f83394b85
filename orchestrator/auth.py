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

"""Authentication with a cluster secret, on ZeroMQ CURVE.

Every process of a cluster knows one shared secret. From it each side derives, with
HMAC-SHA256, the same two CURVE key pairs: one for servers (ROUTER sockets) and one for
clients (DEALER sockets). A client must know the server's public key to even start the
CURVE handshake, and a ZAP handler on the server additionally checks that the client
presents the derived client key. A peer without the secret therefore fails the handshake
inside libzmq: its messages never reach the application, let alone an actor. CURVE also
encrypts the traffic.

The ZAP handler counts rejections (``rejected``) and logs each one with the peer address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from .reactor import SocketReader

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def derive_keys(secret: bytes) -> CurveKeys:
    """The cluster's CURVE key pairs, derived deterministically from ``secret``."""
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("the cluster secret must be at least 16 bytes")
    server_secret = _derive(secret, b"asystem/curve/server")
    client_secret = _derive(secret, b"asystem/curve/client")
    return CurveKeys(
        zmq.curve_public(server_secret), server_secret,
        zmq.curve_public(client_secret), client_secret,
    )


def _derive(secret: bytes, label: bytes) -> bytes:
    return z85.encode(hmac.new(secret, label, hashlib.sha256).digest())


def configure_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    sock.zap_domain = b"asystem"


def configure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public


class ZapHandler:
    """Answers libzmq's authentication requests (RFC 27) for one context: admits exactly
    the CURVE client key derived from the cluster secret."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys):
        self.rejected = 0
        self.accepted = 0
        self._allowed = z85.decode(keys.client_public)
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self._reader = SocketReader(self._sock, self._answer)

    def _answer(self, frames: list) -> None:
        # ROUTER prefix, then RFC 27: [identity, b"", version, request_id, domain, address,
        #                               identity, mechanism, *credentials]
        try:
            route, request = frames[:2], frames[2:]
            version, request_id, _domain, address, _ident, mechanism = request[:6]
            credentials = request[6:]
        except ValueError:
            log.warning("malformed ZAP request dropped")
            return
        if mechanism == b"CURVE" and credentials == [self._allowed]:
            self.accepted += 1
            reply = [version, request_id, b"200", b"OK", b"cluster", b""]
        else:
            self.rejected += 1
            log.warning("rejected unauthenticated peer %s (mechanism %s)",
                        address.decode(errors="replace"), mechanism.decode(errors="replace"))
            reply = [version, request_id, b"400", b"not a cluster member", b"", b""]
        self._sock.send_multipart(route + reply, zmq.NOBLOCK)
        self._reader.kick()

    def close(self) -> None:
        self._reader.close()
        self._sock.close(linger=0)

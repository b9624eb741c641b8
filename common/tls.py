"""TLS for the gRPC ports (front and worker) and for the front's channels to the workers, from PEM file paths."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path | str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def server_credentials(cert: Path | str | None, key: Path | str | None,
                       client_ca: Path | str | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials of a listening port; None (plaintext) when no certificate is configured.

    With `client_ca` the port also requires a client certificate signed by that CA (mutual TLS)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("a client CA (mutual TLS) needs the server's own tls_cert and tls_key")
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate and its private key")
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=_read(client_ca),
                                       require_client_auth=client_ca is not None)


def channel_credentials(ca: Path | str | None, cert: Path | str | None = None,
                        key: Path | str | None = None) -> grpc.ChannelCredentials | None:
    """Credentials of a client channel: TLS verified against `ca`, plus a client certificate for mutual TLS.
    None (plaintext) when neither a CA nor a client certificate is configured."""
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its private key (and the key its certificate)")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                        certificate_chain=_read(cert))


def add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Binds `address` with TLS when credentials are given, else plaintext; returns the port (0 = failed)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)

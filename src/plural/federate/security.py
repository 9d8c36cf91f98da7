"""TLS certificates and SuperNode keys for a federation across machines.

- `make_tls(dir, hosts)`: a private CA and a server certificate for the superlink's host names or
  IP addresses (SANs), PEM files. The superlink serves with ca.pem/server.pem/server.key; nodes and
  `plural federate run` verify it with ca.pem (`--root-certificates`). Organisations with a PKI
  use their own certificates instead; these are for a consortium without one, and for tests.
- `make_node_key(dir, name)`: an ECDSA P-384 key pair in OpenSSH format, the format Flower's
  SuperNode authentication takes: the node keeps NAME (`plural node start --auth-key`), the
  superlink operator registers NAME.pub (`flwr supernode register NAME.pub`, or `register_node`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from plural.federate.launcher import TLS


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def make_tls(out: Path, hosts: list[str], days: int = 365) -> TLS:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plural federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    tls = TLS(out / "ca.pem", out / "server.pem", out / "server.key")
    _write(tls.ca, ca.public_bytes(pem))
    _write(tls.cert, cert.public_bytes(pem))
    _write(tls.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    return tls


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    ssh = serialization.Encoding.OpenSSH
    _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def register_node(client, public_key: Path, name: str = "") -> int:
    """Allow a node's public key on a superlink started with SuperNode authentication; its node id."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest

    res = client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(public_key), name=name))
    return res.node_id

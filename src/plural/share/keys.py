"""Signing keys: EC P-256 private keys in `$PLURAL_HOME/keys/NAME.pem` (mode 0600).

OMS key signing accepts EC P-256/384/521 only (no Ed25519), so plural makes P-256 keys.
A key's id is the sha256 of its public key's PEM (SubjectPublicKeyInfo), the same value that
`model_signing` writes as the key hint in every signature bundle, so a signature names its key.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from plural.errors import PluralError
from plural.store.paths import plural_home

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyInfo(BaseModel):
    name: str
    key_id: str  # sha256 hex of the public PEM
    path: Path


def keys_dir() -> Path:
    return plural_home() / "keys"


def key_path(name: str) -> Path:
    if not _NAME_RE.match(name):
        raise PluralError(f"invalid key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)")
    return keys_dir() / f"{name}.pem"


def public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def load_private(name: str) -> ec.EllipticCurvePrivateKey:
    p = key_path(name)
    if not p.is_file():
        have = ", ".join(k.name for k in list_keys()) or "none"
        raise PluralError(f"no key {name!r} in {keys_dir()} (keys there: {have}). Fix: plural keys new {name}")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise PluralError(f"{p}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PluralError(f"{p}: not an EC key; OMS signatures need EC P-256/384/521")
    return key


def load_public_pem(path: Path) -> ec.EllipticCurvePublicKey:
    """A trusted signer's public key from a PEM file (the output of `plural keys export`)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError as e:
        raise PluralError(f"{path}: no such public key file") from e
    except ValueError as e:
        raise PluralError(f"{path}: not a PEM public key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise PluralError(f"{path}: not an EC P-256/384/521 public key (OMS key signatures use only those)")
    return key


def new_key(name: str, out: Path | None = None) -> KeyInfo:
    p = key_path(name)
    if p.exists():
        raise PluralError(f"key {name!r} already exists ({p}); pick another name")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    keys_dir().mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir(), 0o700)
    # Created 0600 before the secret is written, then renamed: never readable by others, never half-written.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=keys_dir())
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.link(tmp, p)  # fails if the name appeared meanwhile, unlike rename
    finally:
        Path(tmp).unlink(missing_ok=True)
    if out is not None:
        write_public(name, out)
    return KeyInfo(name=name, key_id=key_id(key.public_key()), path=p)


def write_public(name: str, out: Path) -> Path:
    out = Path(out)
    data = public_pem(load_private(name).public_key())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def export_public(name: str) -> str:
    return public_pem(load_private(name).public_key()).decode()


def list_keys() -> list[KeyInfo]:
    d = keys_dir()
    out = []
    if d.is_dir():
        for p in sorted(d.glob("*.pem")):
            if p.name.startswith("."):
                continue
            try:
                key = serialization.load_pem_private_key(p.read_bytes(), password=None)
            except (ValueError, TypeError):
                continue  # not ours to judge here; `load_private` names the problem when it is used
            out.append(KeyInfo(name=p.stem, key_id=key_id(key.public_key()), path=p))
    return out


def local_key_names() -> dict[str, str]:
    """key id -> name of the local keys (to say 'signed by your key acme')."""
    return {k.key_id: k.name for k in list_keys()}

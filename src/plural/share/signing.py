"""Sign an adapter folder in the open standard: OpenSSF Model Signing (OMS) v1.0.

Two files are written into the adapter folder, both Sigstore bundles holding a DSSE envelope
around an in-toto Statement, signed with the same EC key:

    provenance.sig   plural's provenance: predicateType PROVENANCE_TYPE, subjects = every file
                     (name, sha256), predicate = the adapter's name and version and, from
                     plural.json, the base fingerprint, data sha256, config, method, metrics.
    model.sig        the OMS v1.0 signature (predicateType https://model_signing/signature/v1.0)
                     over every file's sha256, provenance.sig included, written by the
                     `model-signing` reference implementation. OpenSSF's own
                     `model_signing verify key ADAPTER --signature ADAPTER/model.sig
                     --public_key PUB.pem` accepts it.

provenance.sig is written first so that model.sig covers it: one OMS check then proves every
byte, and the provenance names the files it speaks about, so it cannot be moved to another
adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel

from plural.errors import PluralError
from plural.share.keys import key_path, load_private
from plural.store.adapters import MANIFEST, read_manifest, resolve_adapter

SIGNATURE = "model.sig"
PROVENANCE = "provenance.sig"
PROVENANCE_TYPE = "https://plural.dev/provenance/v1"
IN_TOTO_PAYLOAD = "application/vnd.in-toto+json"


class Signed(BaseModel):
    path: Path
    name: str
    version: str
    key_id: str
    digest: str


def check_version(version: str, where: str = "--version") -> Version:
    try:
        return Version(version)
    except InvalidVersion as e:
        raise PluralError(f"{where} {version!r}: not a version number (PEP 440, e.g. 1, 1.2, 2.0.1)") from e


def _hashing_config():
    from model_signing import hashing

    # No symlinks (a link could make the signature speak for a file outside the folder); the
    # signature file itself is the only file not signed.
    return hashing.Config().use_file_serialization(allow_symlinks=False).set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def file_digests(path: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """name -> sha256 hex of every file the OMS signature covers, as model_signing hashes them."""
    try:
        manifest = _hashing_config().hash(path)
    except ValueError as e:  # model_signing refuses symlinks with a ValueError
        raise PluralError(f"{path}: {e}") from e
    return {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors() if rd.identifier not in ignore}


def adapter_digest(path: str | Path) -> str:
    """The adapter's content address: sha256 over its files' sha256 digests in name order.

    This is how OMS v1.0 computes its statement's subject digest, over the same files (every
    file but model.sig), so the digest plural shows is the one the signature states.
    """
    h = hashlib.sha256()
    for _name, hexdigest in sorted(file_digests(resolve_adapter(path)).items()):
        h.update(bytes.fromhex(hexdigest))
    return "sha256:" + h.hexdigest()


def _write_atomic(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Statement:
    """What model_signing's signers sign: an object with an in-toto `statement`."""

    def __init__(self, statement: Any) -> None:
        self.statement = statement


def provenance_predicate(manifest: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "base": manifest.get("base", {}),
        "method": manifest.get("method"),
        "data": manifest.get("data", []),
        "config": manifest.get("config", {}),
        "metrics": manifest.get("metrics", {}),
        "created": manifest.get("created"),
    }


def sign_adapter(adapter: str | Path, key: str, name: str | None = None, version: str = "1") -> Signed:
    from in_toto_attestation.v1 import statement
    from model_signing import signing
    from model_signing._signing import sign_ec_key

    path = resolve_adapter(adapter)
    check_version(version)
    name = name or path.name
    manifest = read_manifest(path)
    if not manifest:
        raise PluralError(f"{path}: no {MANIFEST}; plural signs adapters whose provenance it knows")
    load_private(key)  # names a missing or wrong key before anything is written
    signer = sign_ec_key.Signer(key_path(key))

    # 1. provenance.sig over every file but the two signatures.
    subjects = [
        statement.ResourceDescriptor(name=n, digest={"sha256": d}).pb
        for n, d in sorted(file_digests(path, ignore=(PROVENANCE,)).items())
    ]
    stmt = statement.Statement(subjects=subjects, predicate_type=PROVENANCE_TYPE,
                               predicate=provenance_predicate(manifest, name, version))
    prov = signer.sign(_Statement(stmt))
    _write_atomic(path / PROVENANCE, prov.bundle.to_json().encode())

    # 2. model.sig by the reference implementation, into a scratch folder first: the folder
    # is hashed before the signature exists, and the signature lands in one rename.
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / SIGNATURE
        try:
            signing.Config().use_elliptic_key_signer(private_key=key_path(key)).set_hashing_config(_hashing_config()).sign(path, out)
        except ValueError as e:
            raise PluralError(f"{path}: cannot sign: {e}") from e
        _write_atomic(path / SIGNATURE, out.read_bytes())
    from plural.share.keys import key_id

    return Signed(path=path, name=name, version=version, key_id=key_id(load_private(key).public_key()),
                  digest=adapter_digest(path))


def signature_key_hint(path: Path) -> str | None:
    """The key id a signature names (unverified: only a verification proves it)."""
    try:
        bundle = json.loads((path / SIGNATURE).read_text(encoding="utf-8"))
        return bundle["verificationMaterial"]["publicKey"]["hint"] or None
    except (OSError, ValueError, KeyError, TypeError):
        return None

"""Trust policy and verification: is every byte signed, and is the signer trusted for this?

A trust file (YAML) names the signers an organisation trusts and, optionally, what each may
sign for::

    signers:
      - name: acme                        # shown in `plural adapters list/show`
        key: acme.pub.pem                 # from `plural keys export`; relative to this file
        adapters: ["support*"]            # optional: globs over the signed adapter name
        bases: [smollm2-135m-instruct]    # optional: base names or fingerprints (sha256:…)

`--trust PUB.pem` is the one-signer policy with no restrictions.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from plural.config import Strict, read_yaml, validate
from plural.errors import PluralError
from plural.share.keys import key_id, load_public_pem
from plural.share.signing import (
    IN_TOTO_PAYLOAD,
    PROVENANCE,
    PROVENANCE_TYPE,
    SIGNATURE,
    _hashing_config,
    adapter_digest,
    check_version,
    file_digests,
)
from plural.store.adapters import MANIFEST


class SignerEntry(Strict):
    name: str = Field(min_length=1)
    key: Path
    adapters: Optional[list[str]] = None
    bases: Optional[list[str]] = None


class TrustFile(Strict):
    signers: list[SignerEntry] = Field(min_length=1)


class TrustedSigner(BaseModel):
    name: str
    key_path: Path
    key_id: str
    adapters: Optional[list[str]] = None
    bases: Optional[list[str]] = None


class TrustPolicy(BaseModel):
    source: str
    signers: list[TrustedSigner]

    def by_key_id(self, kid: str | None) -> TrustedSigner | None:
        return next((s for s in self.signers if s.key_id == kid), None)


class SignerInfo(BaseModel):
    """What a successful verification established."""

    signer: str  # the trust policy's name for the signer
    key_id: str
    name: str  # the adapter name the signer signed
    version: str
    base_name: Optional[str] = None
    base_fingerprint: Optional[str] = None
    digest: str


def load_policy(path: str | Path) -> TrustPolicy:
    """A trust policy from a trust YAML file or a single public key PEM."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PluralError(f"{p}: no such trust file or public key")
    head = p.read_bytes()[:64]
    if head.lstrip().startswith(b"-----BEGIN"):
        key = load_public_pem(p)
        return TrustPolicy(source=str(p), signers=[TrustedSigner(name=p.name.split(".")[0], key_path=p, key_id=key_id(key))])
    tf = validate(TrustFile, read_yaml(p), str(p))
    signers = []
    for i, s in enumerate(tf.signers):
        kp = s.key if s.key.is_absolute() else (p.parent / s.key)
        if not kp.is_file():
            raise PluralError(f"{p}: signers.{i}.key: {kp}: no such public key file")
        signers.append(TrustedSigner(name=s.name, key_path=kp, key_id=key_id(load_public_pem(kp)), adapters=s.adapters, bases=s.bases))
    return TrustPolicy(source=str(p), signers=signers)


def _read_bundle(path: Path, what: str):
    from model_signing._signing import sign_sigstore_pb

    try:
        return sign_sigstore_pb.Signature.read(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # the bundle parser raises several types for malformed input
        raise PluralError(f"{path}: not a Sigstore bundle ({what}): {e}") from e


def _verify_provenance(folder: Path, signer: TrustedSigner) -> dict:
    """The provenance statement, once its signature and its subjects check out."""
    from cryptography.exceptions import InvalidSignature
    from model_signing._signing import sign_ec_key

    p = folder / PROVENANCE
    if not p.is_file():
        raise PluralError(f"{folder}: no {PROVENANCE} (the signed provenance). Fix: sign it again with plural adapters sign")
    bundle = _read_bundle(p, "provenance")
    try:
        payload_type, payload = sign_ec_key.Verifier(signer.key_path)._verify_signed_content(bundle)
    except (InvalidSignature, ValueError) as e:
        raise PluralError(f"{p}: the provenance signature does not verify with {signer.name}'s key{': ' + str(e) if str(e) else ''}") from e
    stmt = json.loads(payload)
    if payload_type != IN_TOTO_PAYLOAD or stmt.get("predicateType") != PROVENANCE_TYPE:
        raise PluralError(f"{p}: not a plural provenance statement (predicateType {stmt.get('predicateType')!r})")
    signed = {s["name"]: s["digest"]["sha256"] for s in stmt.get("subject", [])}
    actual = file_digests(folder, ignore=(PROVENANCE,))
    if signed != actual:
        diff = sorted(set(signed) ^ set(actual)) or sorted(n for n in signed if signed[n] != actual.get(n))
        raise PluralError(f"{p}: the provenance speaks about other files than these (differs on: {', '.join(diff)}); "
                          "it was copied from another adapter or the files changed")
    return stmt["predicate"]


def _mismatch(bundle, folder: Path) -> str | None:
    """Which files differ from the (already authenticated) signed statement, by name."""
    try:
        stmt = json.loads(bundle.bundle.dsse_envelope.payload)
        signed = {r["name"]: r["digest"] for r in stmt["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError):
        return None
    try:
        folder_digests = file_digests(folder)
    except PluralError as e:
        return str(e)
    parts = []
    changed = sorted(n for n in signed if n in folder_digests and folder_digests[n] != signed[n])
    added = sorted(set(folder_digests) - set(signed))
    missing = sorted(set(signed) - set(folder_digests))
    for label, names in (("changed since signing", changed), ("added", added), ("missing", missing)):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "does not match its signature: " + "; ".join(parts) if parts else None


def verify_adapter(folder: str | Path, policy: TrustPolicy, min_version: str | None = None,
                   check_store: bool = True) -> SignerInfo:
    """Every file matches the OMS signature, the signer is trusted for this adapter and base.

    Raises PluralError naming what failed. `check_store`: the provenance's base must be a
    model in this store (by fingerprint).
    """
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    folder = Path(folder)
    sig = folder / SIGNATURE
    if not sig.is_file():
        raise PluralError(f"{folder}: not signed (no {SIGNATURE}). Fix: plural adapters sign {folder} --key NAME")
    bundle = _read_bundle(sig, "OMS signature")
    hint = bundle.bundle.verification_material.public_key.hint if bundle.bundle.verification_material.public_key else None
    if not hint:
        raise PluralError(f"{sig}: the signature names no public key; plural verifies OMS key signatures (plural adapters sign)")
    signer = policy.by_key_id(hint)
    if signer is None:
        raise PluralError(f"{folder}: signed by key {str(hint)[:16]}…, which is not trusted by {policy.source}")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=signer.key_path).set_hashing_config(_hashing_config()).verify(folder, sig)
    except InvalidSignature as e:
        raise PluralError(f"{sig}: the signature does not verify with {signer.name}'s key (the signed statement was altered)") from e
    except ValueError as e:
        raise PluralError(f"{folder}: {_mismatch(bundle, folder) or e}") from e
    pred = _verify_provenance(folder, signer)
    man_path = folder / MANIFEST
    manifest = json.loads(man_path.read_text(encoding="utf-8")) if man_path.is_file() else {}
    base = pred.get("base") or {}
    fp, base_name = base.get("fingerprint"), base.get("name")
    if (manifest.get("base") or {}).get("fingerprint") != fp:
        raise PluralError(f"{folder}: the provenance's base {fp} is not the base in {MANIFEST}")
    if check_store:
        from plural.store.models import list_models

        if not any(m.fingerprint == fp for m in list_models()):
            raise PluralError(f"{folder}: its base {base_name!r} ({str(fp)[:19]}…) is not in the store. "
                              f"Fix: import that base model (plural models add)")
    name, version = str(pred.get("name")), str(pred.get("version"))
    if signer.adapters is not None and not any(fnmatch.fnmatchcase(name, g) for g in signer.adapters):
        raise PluralError(f"{folder}: signer {signer.name!r} is not trusted for adapter {name!r} "
                          f"(may sign: {', '.join(signer.adapters) or 'nothing'})")
    if signer.bases is not None and not ({base_name, fp} & set(signer.bases)):
        raise PluralError(f"{folder}: signer {signer.name!r} is not trusted for base {base_name!r} "
                          f"(may sign for: {', '.join(signer.bases) or 'nothing'})")
    if min_version is not None and check_version(version, "signed version") < check_version(min_version, "--min-version"):
        raise PluralError(f"{folder}: signed version {version} of {name!r} is older than --min-version {min_version} (a rollback?)")
    return SignerInfo(signer=signer.name, key_id=signer.key_id, name=name, version=version, base_name=base_name,
                      base_fingerprint=fp, digest=adapter_digest(folder))


def require_trusted(adapter_path: Path, policy: TrustPolicy) -> SignerInfo:
    """For registration (`--require-signed`): refuse an unsigned or untrusted adapter."""
    try:
        return verify_adapter(adapter_path, policy)
    except PluralError as e:
        raise PluralError(f"--require-signed {policy.source}: refused: {e}") from e

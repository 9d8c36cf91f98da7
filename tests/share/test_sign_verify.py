"""Keys, OMS v1.0 signatures and trust policies, through the real `plural` executable."""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .helpers import plural

MODEL_SIGNING = str(Path(sys.executable).with_name("model_signing"))


def flip_bit(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_keys_new_list_export(home, tmp_path):
    pub = tmp_path / "k.pub.pem"
    r = plural("keys", "new", "acme", "--out", pub, check=True)
    priv = home / "keys" / "acme.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes()
    exported = plural("keys", "export", "acme", check=True).stdout
    assert exported == pub.read_text() and exported.startswith("-----BEGIN PUBLIC KEY-----")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    assert load_pem_public_key(pub.read_bytes()).curve.name == "secp256r1"
    assert "acme" in plural("keys", "list", check=True).stdout
    assert "already exists" in plural("keys", "new", "acme", check=False).stderr
    assert "invalid key name" in plural("keys", "new", "../evil", check=False).stderr
    assert "no key 'nobody'" in plural("keys", "export", "nobody", check=False).stderr
    assert "acme" in r.stdout


def test_signature_is_accepted_by_openssf_model_signing(home, signer, adapters):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", "--version", "1.2", check=True)
    assert (ad / "model.sig").is_file() and (ad / "provenance.sig").is_file()
    # OpenSSF's own command line, the reference verifier.
    r = subprocess.run([MODEL_SIGNING, "verify", "key", str(ad), "--signature", str(ad / "model.sig"), "--public_key", str(signer)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    # ... and its library API.
    import model_signing

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=signer).verify(ad, ad / "model.sig")
    # The format: a Sigstore bundle, DSSE envelope, in-toto statement with the OMS v1.0 predicate over every file.
    bundle = json.loads((ad / "model.sig").read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://model_signing/signature/v1.0"
    names = {r["name"] for r in stmt["predicate"]["resources"]}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "plural.json", "provenance.sig"}
    # The second statement: plural's provenance, from the manifest.
    prov = json.loads(base64.b64decode(json.loads((ad / "provenance.sig").read_text())["dsseEnvelope"]["payload"]))
    man = json.loads((ad / "plural.json").read_text())
    assert prov["predicateType"] == "https://plural.dev/provenance/v1"
    p = prov["predicate"]
    assert (p["name"], p["version"], p["method"]) == ("support", "1.2", "sft")
    assert p["base"]["fingerprint"] == man["base"]["fingerprint"] and p["metrics"] == {"loss": 1.25}
    assert p["config"] == man["config"] and p["data"] == man["data"]
    assert {s["name"] for s in prov["subject"]} == {"adapter_config.json", "adapter_model.safetensors", "plural.json"}
    # A tampered file fails OpenSSF's verifier as well.
    flip_bit(ad / "adapter_model.safetensors")
    r = subprocess.run([MODEL_SIGNING, "verify", "key", str(ad), "--signature", str(ad / "model.sig"), "--public_key", str(signer)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "adapter_model.safetensors" in r.stderr


def test_verify_succeeds_for_trusted_signer(home, signer, adapters):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    r = plural("adapters", "verify", ad, "--trust", signer, check=True)
    assert "verified" in r.stdout and "support" in r.stdout and "acme" in r.stdout


@pytest.mark.parametrize("fname", ["adapter_model.safetensors", "adapter_config.json", "plural.json", "provenance.sig"])
def test_flipped_bit_in_any_file_fails(home, signer, adapters, fname):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    flip_bit(ad / fname)
    err = plural("adapters", "verify", ad, "--trust", signer, check=False).stderr
    assert f"changed since signing: {fname}" in err


def test_added_file_fails(home, signer, adapters):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    (ad / "extra.py").write_text("import os\n")
    err = plural("adapters", "verify", ad, "--trust", signer, check=False).stderr
    assert "added: extra.py" in err


def test_altered_signed_statement_fails(home, signer, adapters):
    """Someone edits the statement inside model.sig to match their own weights."""
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    flip_bit(ad / "adapter_model.safetensors")
    bundle = json.loads((ad / "model.sig").read_text())
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    from plural.share.signing import file_digests

    actual = file_digests(ad)
    for res in stmt["predicate"]["resources"]:
        res["digest"] = actual[res["name"]]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    (ad / "model.sig").write_text(json.dumps(bundle))
    err = plural("adapters", "verify", ad, "--trust", signer, check=False).stderr
    assert "model.sig" in err or "signature" in err.lower()


def test_unsigned_and_untrusted_fail(home, signer, adapters, tmp_path):
    ad = adapters["support"]
    assert "not signed" in plural("adapters", "verify", ad, "--trust", signer, check=False).stderr
    other = tmp_path / "other.pub.pem"
    plural("keys", "new", "mallory", "--out", other, check=True)
    plural("adapters", "sign", ad, "--key", "mallory", check=True)
    err = plural("adapters", "verify", ad, "--trust", signer, check=False).stderr
    assert "not trusted" in err and "acme.pub.pem" in err
    (ad / "model.sig").write_text("not a bundle")
    assert "not a Sigstore bundle" in plural("adapters", "verify", ad, "--trust", signer, check=False).stderr


def test_signature_copied_from_another_adapter_fails(home, signer, adapters):
    a, b = adapters["support"], adapters["legal"]
    plural("adapters", "sign", b, "--key", "acme", check=True)
    for f in ("model.sig", "provenance.sig"):
        shutil.copy(b / f, a / f)
    err = plural("adapters", "verify", a, "--trust", signer, check=False).stderr
    assert "changed since signing: adapter_model.safetensors" in err
    # Only the provenance copied (model.sig re-made by a trusted signer over the mix): the
    # provenance names other files' digests and is refused on its own.
    plural("adapters", "sign", a, "--key", "acme", check=True)
    shutil.copy(b / "provenance.sig", a / "provenance.sig")
    from plural.share.signing import sign_adapter  # re-sign only model.sig, as a careless signer would

    import model_signing

    from plural.share.keys import key_path
    from plural.share.signing import _hashing_config

    (a / "model.sig").unlink()
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key_path("acme")).set_hashing_config(_hashing_config()).sign(a, a / "model.sig")
    err = plural("adapters", "verify", a, "--trust", signer, check=False).stderr
    assert "provenance speaks about other files" in err
    assert sign_adapter  # imported for the reader: the proper path re-signs both


def test_provenance_base_not_in_store_fails(home, signer, adapters):
    ad = adapters["support"]
    man = json.loads((ad / "plural.json").read_text())
    man["base"]["fingerprint"] = "sha256:" + "0" * 64
    (ad / "plural.json").write_text(json.dumps(man))
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    err = plural("adapters", "verify", ad, "--trust", signer, check=False).stderr
    assert "is not in the store" in err and "sha256:000000000000" in err


def test_trust_file_restricts_adapters_and_bases(home, signer, adapters, tmp_path):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)

    def trust(**limits) -> Path:
        p = tmp_path / "trust.yaml"
        p.write_text(yaml.safe_dump({"signers": [{"name": "Acme Corp", "key": signer.name, **limits}]}))
        return p

    assert "Acme Corp" in plural("adapters", "verify", ad, "--trust", trust(), check=True).stdout
    plural("adapters", "verify", ad, "--trust", trust(adapters=["supp*"], bases=["tiny"]), check=True)
    err = plural("adapters", "verify", ad, "--trust", trust(adapters=["legal*"]), check=False).stderr
    assert "not trusted for adapter 'support'" in err
    err = plural("adapters", "verify", ad, "--trust", trust(bases=["smollm2-135m-instruct"]), check=False).stderr
    assert "not trusted for base 'tiny'" in err


def test_bad_trust_files_name_the_problem(home, signer, adapters, tmp_path):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    p = tmp_path / "trust.yaml"
    p.write_text(yaml.safe_dump({"signers": [{"name": "a", "key": signer.name, "adaptors": ["x"]}]}))
    assert "signers.0.adaptors: unknown key" in plural("adapters", "verify", ad, "--trust", p, check=False).stderr
    p.write_text(yaml.safe_dump({"signers": [{"name": "a", "key": "missing.pem"}]}))
    assert "signers.0.key" in plural("adapters", "verify", ad, "--trust", p, check=False).stderr
    p.write_text("signers: [\n")
    assert "trust.yaml:" in plural("adapters", "verify", ad, "--trust", p, check=False).stderr


def test_min_version_refuses_rollback(home, signer, adapters):
    ad = adapters["support"]
    plural("adapters", "sign", ad, "--key", "acme", "--version", "1.9", check=True)
    plural("adapters", "verify", ad, "--trust", signer, "--min-version", "1.9", check=True)
    err = plural("adapters", "verify", ad, "--trust", signer, "--min-version", "1.10", check=False).stderr
    assert "older than --min-version 1.10" in err
    assert "not a version" in plural("adapters", "sign", ad, "--key", "acme", "--version", "new", check=False).stderr


def test_list_and_show(home, signer, adapters):
    from plural.share.signing import adapter_digest

    store_ads = home / "adapters"
    shutil.copytree(adapters["support"], store_ads / "support")
    shutil.copytree(adapters["legal"], store_ads / "legal")
    plural("adapters", "sign", "support", "--key", "acme", check=True)
    digest = adapter_digest(store_ads / "support")
    assert digest.startswith("sha256:") and digest != adapter_digest(store_ads / "legal")
    shown = json.loads(plural("adapters", "show", "support", "--trust", signer, check=True).stdout)
    assert shown["digest"] == digest and shown["method"] == "sft" and shown["base"]["name"] == "tiny"
    assert shown["signature"]["trusted"] is True and shown["signature"]["name"] == "acme"
    assert shown["metrics"] == {"loss": 1.25} and shown["created"]
    out = plural("adapters", "list", "--trust", signer, env={"COLUMNS": "250"}, check=True).stdout
    lines = {l.split("│")[1].strip(): l for l in out.splitlines() if l.count("│") > 3}
    assert digest[:19] in lines["support"] and "yes" in lines["support"] and "acme" in lines["support"]
    assert "unsigned" in lines["legal"] and "NO" in lines["legal"]
    (store_ads / "support" / "extra.txt").write_text("x")
    shown = json.loads(plural("adapters", "show", "support", "--trust", signer, check=True).stdout)
    assert shown["signature"]["trusted"] is False and "extra.txt" in shown["signature"]["why"]
    assert "not found" in plural("adapters", "show", "nope", check=False).stderr


def test_eval_require_signed_refuses_unsigned(home, signer, adapters, tmp_path):
    ad = adapters["support"]
    err = plural("eval", "--model", "tiny", "--adapter", ad, "--require-signed", signer, "--output", tmp_path / "r", check=False).stderr
    assert "--require-signed" in err and "not signed" in err
    assert not (tmp_path / "r").exists()
    other = tmp_path / "m.pub.pem"
    plural("keys", "new", "mallory", "--out", other, check=True)
    plural("adapters", "sign", ad, "--key", "mallory", check=True)
    err = plural("eval", "--model", "tiny", "--adapter", ad, "--require-signed", signer, "--output", tmp_path / "r", check=False).stderr
    assert "not trusted" in err
    # Signed by the trusted key: the evaluation runs.
    plural("adapters", "sign", ad, "--key", "acme", check=True)
    plural("eval", "--model", "tiny", "--adapter", ad, "--limit", "1", "--require-signed", signer, "--output", tmp_path / "r", check=True, timeout=300)
    assert (tmp_path / "r" / "report.json").is_file()

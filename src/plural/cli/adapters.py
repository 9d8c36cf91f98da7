"""`plural adapters list|show|sign|verify|push|pull`: adapters as signed, shareable artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from plural.errors import PluralError

app = typer.Typer(help="Adapters in the store: sign, verify, list, and move them through OCI registries and peers.", no_args_is_help=True)
out = Console()

_TRUST = typer.Option(None, "--trust", help="Trusted signers: a public key PEM or a trust file (YAML).")
_INSECURE = typer.Option(False, "--insecure", help="Plain HTTP (a registry on loopback).")
_TOKEN = typer.Option(None, "--token", envvar="PLURAL_SHARE_TOKEN", help="Bearer key for a plural peer (admin or share key).")


def _policy(trust: Optional[Path]):
    from plural.share.trust import load_policy

    return load_policy(trust) if trust is not None else None


@app.command("sign")
def sign(
    adapter: str = typer.Argument(..., help="Adapter folder or name in the store."),
    key: str = typer.Option(..., "--key", help="Signing key name (plural keys new NAME)."),
    name: Optional[str] = typer.Option(None, "--name", help="Adapter name the signature states (default: the folder name)."),
    version: str = typer.Option("1", "--version", help="Version the signature states (pull --min-version compares it)."),
) -> None:
    """Write an OpenSSF Model Signing v1.0 signature (model.sig) and signed provenance into the adapter."""
    from plural.share.signing import sign_adapter

    s = sign_adapter(adapter, key, name=name, version=version)
    out.print(f"signed [bold]{s.name}[/] version {s.version} with key {key} ({s.key_id[:16]}…): {s.path / 'model.sig'}; digest {s.digest}")


@app.command("verify")
def verify(
    adapter: str = typer.Argument(..., help="Adapter folder or name in the store."),
    trust: Path = typer.Option(..., "--trust", help="Trusted signers: a public key PEM or a trust file (YAML)."),
    min_version: Optional[str] = typer.Option(None, "--min-version", help="Refuse a signed version older than this."),
) -> None:
    """Exit 0 only if every file matches the signature and the signer is trusted for this adapter."""
    from plural.share.trust import load_policy, verify_adapter
    from plural.store.adapters import resolve_adapter

    info = verify_adapter(resolve_adapter(adapter), load_policy(trust), min_version=min_version)
    out.print(f"verified: [bold]{info.name}[/] version {info.version}, signed by {info.signer} ({info.key_id[:16]}…), "
              f"base {info.base_name}, digest {info.digest}")


def _describe(path: Path, policy) -> dict:
    from plural.share.keys import local_key_names
    from plural.share.signing import adapter_digest, signature_key_hint
    from plural.share.trust import verify_adapter
    from plural.store.adapters import read_manifest

    man = read_manifest(path)
    hint = signature_key_hint(path)
    signer: dict = {"signed": (path / "model.sig").is_file(), "key_id": hint}
    if hint and hint in local_key_names():
        signer["local_key"] = local_key_names()[hint]
    if policy is not None and signer["signed"]:
        try:
            info = verify_adapter(path, policy)
            signer.update(trusted=True, name=info.signer, version=info.version)
        except PluralError as e:
            signer.update(trusted=False, why=str(e))
    elif policy is not None:
        signer["trusted"] = False
    return {
        "name": path.name,
        "path": str(path),
        "digest": adapter_digest(path),
        "base": man.get("base", {}),
        "method": man.get("method"),
        "created": man.get("created"),
        "metrics": man.get("metrics", {}),
        "signature": signer,
    }


@app.command("list")
def list_(trust: Optional[Path] = _TRUST) -> None:
    """List the adapters in the store: digest, base, method, signer (trusted with --trust), created, metrics."""
    from plural.store.paths import adapters_dir

    policy = _policy(trust)
    root = adapters_dir()
    rows = [_describe(d, policy) for d in sorted(root.iterdir())
            if not d.name.startswith(".") and (d / "adapter_config.json").is_file()] if root.is_dir() else []
    if not rows:
        out.print(f"no adapters in {root}. Pull one with: plural adapters pull REF")
        return
    t = Table("name", "digest", "base", "method", "signer", "trusted", "created", "metrics")
    for r in rows:
        s = r["signature"]
        who = s.get("name") or s.get("local_key") or (s["key_id"][:16] + "…" if s.get("key_id") else ("unsigned" if not s["signed"] else "?"))
        trusted = "-" if "trusted" not in s else ("yes" if s["trusted"] else "NO")
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(r["metrics"].items())[:3])
        t.add_row(r["name"], r["digest"][:19] + "…", str(r["base"].get("name", "?")), str(r["method"]), who, trusted,
                  str(r["created"] or ""), metrics)
    out.print(t)


@app.command("show")
def show(name: str = typer.Argument(..., help="Adapter folder or name in the store."), trust: Optional[Path] = _TRUST) -> None:
    """Print an adapter's digest, base, method, signer, created time and metrics (JSON)."""
    from plural.store.adapters import resolve_adapter

    out.print_json(json.dumps(_describe(resolve_adapter(name), _policy(trust))))


@app.command("push")
def push(
    adapter: str = typer.Argument(..., help="Adapter folder or name in the store."),
    ref: str = typer.Argument(..., help="REGISTRY/REPO:TAG, e.g. 127.0.0.1:5000/acme/support:v1"),
    insecure: bool = _INSECURE,
    token: Optional[str] = _TOKEN,
) -> None:
    """Push the adapter as an OCI artifact (CNCF ModelPack media types)."""
    from plural.share.oci import push as do_push

    with out.status(f"pushing to {ref}…"):
        r, digest = do_push(adapter, ref, insecure=insecure, token=token)
    out.print(f"pushed {r} ({digest})")


@app.command("pull")
def pull(
    ref: str = typer.Argument(..., help="[http://]REGISTRY/REPO[:TAG|@sha256:…]; a plural peer too: http://peer:8000/acme/support:v1"),
    trust: Optional[Path] = _TRUST,
    min_version: Optional[str] = typer.Option(None, "--min-version", help="Refuse a signed version older than this (needs --trust)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in the store (default: the repository's last part)."),
    force: bool = typer.Option(False, "--force", help="Replace an adapter of the same name."),
    insecure: bool = _INSECURE,
    token: Optional[str] = _TOKEN,
) -> None:
    """Pull an adapter into the store; with --trust nothing is installed unless it verifies."""
    from plural.share.oci import pull as do_pull

    policy = _policy(trust)
    with out.status(f"pulling {ref}…"):
        res = do_pull(ref, trust=policy, min_version=min_version, name=name, force=force, insecure=insecure, token=token)
    who = f", signed by {res.signer} (version {res.version})" if res.signer else " (not verified: no --trust)"
    out.print(f"pulled [bold]{res.name}[/] → {res.path}; digest {res.digest}{who}")

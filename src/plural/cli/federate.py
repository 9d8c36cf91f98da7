"""`plural federate local|run` and `plural node start`: federated LoRA fine-tuning on Flower."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from plural.errors import PluralError

out = Console()
federate_app = typer.Typer(help="Train one adapter together with other organisations (Flower); only adapter updates travel.", no_args_is_help=True)
node_app = typer.Typer(help="Run this organisation's Flower node (flower-supernode) on its own data.", no_args_is_help=True)


def _load(config: Path, overrides: list[str], resume: bool):
    from plural.config import load_config
    from plural.federate.config import FederateConfig

    cfg = load_config(FederateConfig, config, overrides)
    return cfg.model_copy(update={"resume": resume})


def _summary(adapter: Path) -> None:
    from rich.table import Table

    from plural.store.adapters import read_manifest

    man = read_manifest(adapter)
    fed, m = man.get("federation", {}), man.get("metrics", {})
    t = Table("adapter", "rounds", "organisations", "strategy", "held-out loss", "privacy")
    priv = fed.get("privacy")
    t.add_row(str(adapter), str(fed.get("rounds")), ", ".join(n["org"] for n in fed.get("nodes", [])), str(fed.get("strategy")),
              f"{m['eval_loss']:.4f}" if m.get("eval_loss") is not None else "-",
              f"ε={priv['epsilon']:.3f}, δ={priv['delta']:g}" if priv else "none")
    out.print(t)


@federate_app.command("local")
def local(
    config: Path = typer.Argument(..., help="Federation config (YAML)."),
    orgs: int = typer.Option(..., "--orgs", min=1, help="Organisations (supernodes) to start, one per entry of `partitions:`."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set rounds=3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder from its last round checkpoint."),
    audit: bool = typer.Option(False, "--audit", help="Each node logs a summary of every message it receives and sends (run folder/flower/audit)."),
) -> None:
    """Run a whole federation on this machine: a superlink and N supernodes on 127.0.0.1."""
    from plural.federate.launcher import local as run_local

    cfg = _load(config, set_, resume)
    adapter = run_local(cfg, orgs, lambda s: out.print(s, highlight=False, soft_wrap=True), audit=audit)
    _summary(adapter)


@federate_app.command("run")
def run(
    config: Path = typer.Argument(..., help="Federation config (YAML); `output:` is a path on the superlink's machine."),
    superlink: str = typer.Option(..., "--superlink", help="The superlink's address HOST:PORT."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="CA certificate (PEM) to verify the superlink's TLS certificate."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP without TLS (tests and trusted networks only)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last round checkpoint (after a server restart)."),
    detach: bool = typer.Option(False, "--detach", help="Submit and return; follow later with `flwr log`."),
) -> None:
    """Submit a federation to a running superlink (like `flwr run`) and stream its progress."""
    from plural.federate import launcher

    if (root_certificates is None) == (not insecure):
        raise PluralError("give --root-certificates CA.pem (TLS) or --insecure (no TLS), exactly one")
    cfg = _load(config, set_, resume)
    client = launcher.control_client(superlink, _input_file(root_certificates, "--root-certificates"), _flwr_home("cli"))
    run_id = launcher.submit(client, cfg)
    out.print(f"run {run_id} submitted to {superlink}")
    if detach:
        return
    try:
        status = launcher.follow(client, run_id, lambda s: out.print(s, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        launcher.stop_run(client, run_id)
        raise
    if status != "finished:completed":
        raise PluralError(f"run {run_id} ended as {status}; `flwr log {run_id}` on the superlink shows why")
    out.print(f"run {run_id} finished; the adapter is at {cfg.output / 'adapter'} on the superlink's machine")


@federate_app.command("superlink")
def superlink(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for other machines)."),
    port: int = typer.Option(9092, "--port", help="Port of the Fleet, Control and runtime APIs."),
    tls: Optional[Path] = typer.Option(None, "--tls", help="Folder with ca.pem, server.pem, server.key (see `plural federate certs`)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP without TLS (tests and trusted networks only)."),
    node_auth: bool = typer.Option(False, "--node-auth", help="Admit only nodes whose public key was registered (`plural federate allow-node`)."),
    database: Optional[Path] = typer.Option(None, "--database", help="SQLite state file, kept across restarts (default: $PLURAL_HOME/flwr/superlink/state.db)."),
) -> None:
    """Run the federation's server side (flower-superlink) in the foreground."""
    from plural.federate.launcher import TLS, superlink_cmd

    if (tls is None) == (not insecure):
        raise PluralError("give --tls DIR or --insecure (no TLS), exactly one")
    t = None
    if tls is not None:
        t = TLS(tls / "ca.pem", tls / "server.pem", tls / "server.key")
        for f in (t.ca, t.cert, t.key):
            if not f.is_file():
                raise PluralError(f"{f}: missing (create the files with `plural federate certs {tls} --host HOST`)")
    db = database or _flwr_home("superlink") / "state.db"
    _out_folder(db.parent, "--database")
    _foreground(superlink_cmd(host, port, db, t, node_auth), "superlink")


@federate_app.command("certs")
def certs(
    out_dir: Path = typer.Argument(..., help="Folder to write ca.pem, server.pem, server.key into."),
    host: List[str] = typer.Option(..., "--host", help="Host name or IP address the nodes use to reach the superlink (repeatable)."),
) -> None:
    """Create a private CA and the superlink's TLS certificate (give ca.pem to every node)."""
    from plural.federate.security import make_tls

    for h in host:
        _check_host(h)
    _out_folder(out_dir, "OUT_DIR")
    if (out_dir / "server.key").exists():
        raise PluralError(f"{out_dir / 'server.key'} already exists; nodes trust the CA beside it. Fix: remove the folder's files or choose another folder")
    t = make_tls(out_dir, host)
    out.print(f"superlink: --tls {out_dir}   nodes and `federate run`: --root-certificates {t.ca}")


@federate_app.command("allow-node")
def allow_node(
    public_key: Path = typer.Argument(..., help="The node's public key (NAME.pub from `plural node keygen`)."),
    superlink: str = typer.Option(..., "--superlink", help="The superlink's address HOST:PORT."),
    root_certificates: Path = typer.Option(..., "--root-certificates", help="CA certificate (PEM) of the superlink."),
    name: str = typer.Option("", "--name", help="A name for the node in `flwr supernode ls`."),
) -> None:
    """Register a node's public key on a superlink started with --node-auth."""
    from plural.federate.launcher import control_client
    from plural.federate.security import register_node

    public_key = _input_file(public_key, "PUBLIC_KEY")
    node_id = register_node(control_client(superlink, _input_file(root_certificates, "--root-certificates"), _flwr_home("cli")), public_key, name)
    out.print(f"node {node_id} may now connect with the matching private key")


def _foreground(cmd: list[str], sub: str) -> None:
    from plural.federate.launcher import BIN, FLWR_ENV

    out.print(f"[dim]{' '.join(cmd)}[/]")
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(_flwr_home(sub)), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    p = subprocess.Popen(cmd, env=env)
    try:
        rc = p.wait()
    except KeyboardInterrupt:
        p.terminate()
        p.wait()
        raise
    if rc != 0:
        raise PluralError(f"{Path(cmd[0]).name} exited with code {rc}")


def _input_file(path: Optional[Path], flag: str) -> Optional[Path]:
    """An existing file given on the command line, as an absolute path (Flower wants absolute ones)."""
    if path is None:
        return None
    if not path.is_file():
        raise PluralError(f"{flag} {path}: no such file")
    return path.resolve()


def _out_folder(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only or missing parent
        raise PluralError(f"{flag} {path}: cannot create the folder ({e.strerror})") from e


def _check_host(host: str) -> None:
    """An IP address or a DNS name (RFC 1123 labels), as the certificate's subjectAltName needs."""
    import ipaddress
    import re

    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(host) > 253 or not re.fullmatch(rf"{label}(\.{label})*\.?", host):
        raise PluralError(f"--host {host!r}: not an IP address or a DNS name")


def _flwr_home(sub: str) -> Path:
    from plural.store.paths import plural_home

    return Path(os.environ.get("FLWR_HOME") or plural_home() / "flwr" / sub)


@node_app.command("start")
def node_start(
    superlink: str = typer.Option(..., "--superlink", help="The superlink's Fleet address HOST:PORT."),
    data: Path = typer.Option(..., "--data", help="This organisation's data folder: train.jsonl (+ eval.jsonl). It never leaves this machine."),
    name: Optional[str] = typer.Option(None, "--name", help="Organisation name shown in progress and the manifest (default: the folder's name)."),
    port: int = typer.Option(9094, "--port", help="Local port of the node's ClientApp runtime API (127.0.0.1)."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="CA certificate (PEM) to verify the superlink's TLS certificate."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP without TLS (tests and trusted networks only)."),
    auth_key: Optional[Path] = typer.Option(None, "--auth-key", help="This node's private key (OpenSSH ECDSA) for SuperNode authentication."),
    audit: Optional[Path] = typer.Option(None, "--audit", help="JSONL file: a summary of every message this node receives and sends."),
) -> None:
    """Start a Flower supernode that trains on DATA when the federation asks (Ctrl-C stops it)."""
    from plural.federate.launcher import check_node_data, supernode_cmd

    if (root_certificates is None) == (not insecure):
        raise PluralError("give --root-certificates CA.pem (TLS) or --insecure (no TLS), exactly one")
    check_node_data(data)
    root_certificates, auth_key = _input_file(root_certificates, "--root-certificates"), _input_file(auth_key, "--auth-key")
    _foreground(supernode_cmd(superlink, data, name or data.resolve().name, port, root_certificates, auth_key, audit), "node")


@node_app.command("keygen")
def node_keygen(
    out_dir: Path = typer.Argument(..., help="Folder for the key pair."),
    name: str = typer.Option("node", "--name", help="File name: NAME (private, stays here) and NAME.pub (send to the superlink's operator)."),
) -> None:
    """Create this node's key pair for SuperNode authentication."""
    from plural.federate.security import make_node_key

    _out_folder(out_dir, "OUT_DIR")
    if (out_dir / name).exists():
        raise PluralError(f"{out_dir / name} already exists; a node key is never overwritten. Fix: --name OTHER or remove it")
    priv, pub = make_node_key(out_dir, name)
    out.print(f"private key: {priv} (plural node start --auth-key {priv})\npublic key: {pub} (plural federate allow-node {pub} ...)")


def register(app: typer.Typer) -> None:
    app.add_typer(federate_app, name="federate")
    app.add_typer(node_app, name="node")

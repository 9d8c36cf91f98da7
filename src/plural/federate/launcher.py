"""Start Flower's processes and submit a federation run to a superlink.

- `local(cfg, orgs)`: a real `flower-superlink` and N `flower-supernode` processes on 127.0.0.1
  (telemetry off), one per data partition; submits the run, streams progress, and stops every
  process it started at the end, on error and on Ctrl-C (each in its own process group, stopped
  by PID: SIGTERM, then SIGKILL).
- `submit` / `follow`: what `flwr run` does, through Flower's Control API: the Flower App
  Bundle (FAB) is just a pyproject.toml whose components point at plural's installed
  ServerApp and ClientApp, with the federation config as the run config `plural` (JSON).
- `supernode_cmd` / `superlink_cmd`: the command lines `plural node start` and the docs use.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from plural.errors import PluralError
from plural.federate.config import FederateConfig

BIN = Path(sys.executable).parent
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class TLS:
    """Certificates for TLS on the superlink (server side) and the CA that clients verify with."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Processes:
    """Processes this launcher started; `stop()` ends each one's process group by its PID."""

    procs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")
        # Flower finds flower-superexec / flwr-clientapp on PATH: put this environment's bin first.
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **FLWR_ENV, "PATH": path, **(env or {})}, start_new_session=True)
        fh.close()
        self.procs.append((name, p, log))
        return p

    def stop_one(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        """Stop `p` and every process under it, by PID: SIGTERM, then SIGKILL after `grace` s.

        Flower's superlink/supernode start `flower-superexec` in a session of its own, which
        starts `flwr-serverapp` / `flwr-clientapp`: so the tree is walked, not the process group."""
        import psutil

        for _ in range(2):  # a second pass catches a child spawned while the first ran
            try:
                root = psutil.Process(p.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
            procs = [q for q in procs if q.is_running()]
            if not procs:
                break
            for q in procs:
                try:
                    q.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=grace)
            for q in alive:
                try:
                    q.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=2)
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        for _, p, _ in reversed(self.procs):
            self.stop_one(p)
        self.procs.clear()

    def check_alive(self) -> None:
        for name, p, log in self.procs:
            if p.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
                raise PluralError(f"{name} exited with code {p.returncode}; its log {log} ends with:\n" + "\n".join(tail))


def _exe(name: str) -> str:
    p = BIN / name
    if not p.exists():
        raise PluralError(f"{name} not found next to {sys.executable}. Fix: pip install 'plural[federate]' (flwr 1.42)")
    return str(p)


def superlink_cmd(host: str, port: int, database: Path, tls: TLS | None = None, node_auth: bool = False) -> list[str]:
    """The superlink keeps its state (registered nodes, runs) in an SQLite `database`, so that
    after a restart the nodes it knew can reconnect without re-registering."""
    cmd = [_exe("flower-superlink"), "--host", host, "--port", str(port), "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--database", str(database)]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_cmd(superlink: str, data: Path, org: str, port: int, root_certificates: Path | None = None,
                  auth_key: Path | None = None, audit: Path | None = None) -> list[str]:
    conf = f'data-dir="{Path(data).resolve()}" org="{org}"'
    if audit is not None:
        conf += f' audit-log="{Path(audit).resolve()}"'
    cmd = [_exe("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", conf]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def check_node_data(data: Path) -> None:
    if not (Path(data) / "train.jsonl").is_file():
        raise PluralError(f"{data}: a node's data folder must hold train.jsonl (and optionally eval.jsonl)")


# ----------------------------------------------------------------------------- Control API

def app_pyproject(cfg: FederateConfig) -> bytes:
    """The Flower App's pyproject.toml: components are plural's installed apps; config in `plural`."""
    import tomli_w

    from plural import __version__

    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "plural-federate", "version": __version__, "description": "plural federated LoRA fine-tuning",
                    "license": "Apache-2.0", "dependencies": ["flwr==1.42.0"]},
        "tool": {"flwr": {"app": {
            "publisher": "plural",
            "components": {"serverapp": "plural.federate.server:app", "clientapp": "plural.federate.client:app"},
            "config": {"plural": cfg.to_json()},
        }}},
    }
    return tomli_w.dumps(doc).encode()


def control_client(address: str, root_certificates: Path | None, flwr_home: Path):
    os.environ["FLWR_HOME"] = str(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    conn = SuperLinkConnection(name="plural", address=address, insecure=root_certificates is None,
                               root_certificates=str(root_certificates) if root_certificates else None)
    return init_http_client_from_connection(conn)


def submit(client, cfg: FederateConfig) -> int:
    """Start a run on the superlink (like `flwr run`); returns its run id."""
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    if cfg.resume:
        stop_stale_runs(client)
    fab_bytes, _ = build_fab_from_files({"pyproject.toml": app_pyproject(cfg)})
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    try:
        res = client.StartRun(StartRunRequest(fab=fab_to_proto(fab)))
    except Exception as e:  # httpx / protobuf-over-HTTP errors: say where we tried
        raise PluralError(f"could not start the run on the superlink: {e}") from e
    if not res.HasField("run_id"):
        raise PluralError("the superlink did not start the run")
    return res.run_id


def stop_stale_runs(client) -> list[int]:
    """Stop unfinished plural runs left in a restarted superlink's database.

    Their ServerApp died with the superlink, but their queued messages would still be pulled by
    the nodes, which would then spend a round's work on a run nobody collects. Returns the ids."""
    stale = [rid for rid, run in _list_runs(client).items()
             if run.fab_id.endswith("/plural-federate") and not _status(run).startswith("finished")]
    for rid in stale:
        stop_run(client, rid)
    return stale


def all_runs(client) -> dict[int, str]:
    """Every run the superlink knows, with its status as `run_status` spells it."""
    return {rid: _status(run) for rid, run in _list_runs(client).items()}


def run_status(client, run_id: int) -> str:
    """'pending' | 'starting' | 'running' | 'finished:completed' | 'finished:failed' | …"""
    return _status(_list_runs(client, run_id)[run_id])


def _list_runs(client, run_id: int | None = None) -> dict:
    """The superlink's runs (protobuf `Run`s by id): all of them, or the one asked for."""
    from flwr.proto.control_pb2 import ListRunsRequest

    req = ListRunsRequest() if run_id is None else ListRunsRequest(run_id=run_id)
    return client.ListRuns(req).run_dict


def _status(run) -> str:
    st = run.status
    return f"{st.status}:{st.sub_status}" if st.sub_status else st.status


def online_nodes(client) -> int:
    from flwr.proto.control_pb2 import ListNodesRequest

    return sum(1 for n in client.ListNodes(ListNodesRequest()).nodes_info if n.status == "online")


def wait_for_nodes(client, n: int, timeout: float, alive: Callable[[], None] | None = None) -> None:
    """Block until `n` supernodes are online (so round 1 includes every organisation)."""
    end = time.time() + timeout
    while online_nodes(client) < n:
        if time.time() > end:
            raise PluralError(f"only {online_nodes(client)} of {n} nodes connected to the superlink within {timeout:.0f} s")
        if alive:
            alive()
        time.sleep(0.5)


def stop_run(client, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    except Exception:  # best effort while shutting down; the processes are stopped next
        pass


def _stream_logs(client, run_id: int, on_line: Callable[[str], None], stop: threading.Event) -> None:
    from flwr.proto.control_pb2 import StreamLogsRequest

    after = 0.0
    while not stop.is_set():
        try:
            for res in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=after)):
                after = max(after, res.latest_timestamp)
                for line in res.log_output.splitlines():
                    on_line(line)
                if stop.is_set():
                    return
        except Exception:  # the stream ends when the run does or the link restarts; poll again
            pass
        stop.wait(1.0)


def progress_printer(echo: Callable[[str], None]) -> Callable[[str], None]:
    """Show the ServerApp's `plural:` lines (rounds, per-node loss, tokens, bytes) and errors."""
    def on_line(line: str) -> None:
        if "plural: " in line:
            echo(line.split("plural: ", 1)[1])
        elif "ERROR" in line or "Traceback" in line:
            echo(line)
    return on_line


def follow(client, run_id: int, echo: Callable[[str], None], alive: Callable[[], None] | None = None, poll: float = 1.0) -> str:
    """Stream the run's progress until it finishes; returns the final status."""
    stop = threading.Event()
    t = threading.Thread(target=_stream_logs, args=(client, run_id, progress_printer(echo), stop), daemon=True)
    t.start()
    try:
        while True:
            status = run_status(client, run_id)
            if status.startswith("finished"):
                time.sleep(1.5)  # let the last log lines arrive
                return status
            if alive:
                alive()
            time.sleep(poll)
    finally:
        stop.set()


# ----------------------------------------------------------------------------- local federation

@dataclass
class LocalFederation:
    """A superlink and N supernodes on 127.0.0.1, all started (and stopped) by us."""

    workdir: Path
    procs: Processes = field(default_factory=Processes)
    port: int = 0
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_args: dict[str, tuple[Path, int]] = field(default_factory=dict)
    superlink: subprocess.Popen | None = None
    audit: bool = False
    tls: TLS | None = None
    node_auth: bool = False

    def start_superlink(self) -> None:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = superlink_cmd("127.0.0.1", self.port, self.workdir / "superlink.db", self.tls, self.node_auth)
        self.superlink = self.procs.start("flower-superlink", cmd, self.workdir / "logs" / "superlink.log",
                                          env={"FLWR_HOME": str(self.workdir / "flwr" / "superlink")})
        _wait_port(self.port, self.superlink, self.workdir / "logs" / "superlink.log")

    def start_node(self, org: str, data: Path, threads: int | None = None, auth_key: Path | None = None) -> subprocess.Popen:
        check_node_data(data)
        port = self.node_args.get(org, (data, free_port()))[1]
        self.node_args[org] = (data, port)
        audit = self.workdir / "audit" / f"{org}.jsonl" if self.audit else None
        if audit:
            audit.parent.mkdir(parents=True, exist_ok=True)
        env = {"FLWR_HOME": str(self.workdir / "flwr" / org)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = supernode_cmd(f"127.0.0.1:{self.port}", data, org, port, self.tls.ca if self.tls else None, auth_key, audit)
        p = self.procs.start(f"flower-supernode ({org})", cmd,
                             self.workdir / "logs" / f"node-{org}.log", env=env)
        self.nodes[org] = p
        return p

    def kill_node(self, org: str) -> None:
        self.procs.stop_one(self.nodes.pop(org), grace=0.5)

    def kill_superlink(self) -> None:
        self.procs.stop_one(self.superlink, grace=0.5)
        self.superlink = None

    def client(self):
        return control_client(f"127.0.0.1:{self.port}", self.tls.ca if self.tls else None, self.workdir / "flwr" / "cli")

    def alive(self) -> None:
        """Raise if the superlink died (a node dying is tolerated by the federation)."""
        if self.superlink is not None and self.superlink.poll() is not None:
            raise PluralError(f"flower-superlink exited with code {self.superlink.returncode}; see {self.workdir / 'logs' / 'superlink.log'}")

    def stop(self) -> None:
        self.procs.stop()


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise PluralError(f"flower-superlink exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise PluralError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}")


def local(cfg: FederateConfig, orgs: int, echo: Callable[[str], None], audit: bool = False) -> Path:
    """`plural federate local`: run the whole federation on this machine; returns the adapter folder."""
    if orgs < cfg.min_nodes:
        raise PluralError(f"--orgs {orgs} is fewer than min_nodes={cfg.min_nodes}")
    if len(cfg.partitions) < orgs:
        raise PluralError(f"partitions: the config lists {len(cfg.partitions)} data folder(s), --orgs asks for {orgs}")
    parts = cfg.partitions[:orgs]
    for p in parts:
        check_node_data(p)
    out = cfg.output
    from plural.federate.checkpoint import started

    if not cfg.resume and started(out):
        raise PluralError(f"run folder {out} exists and is not empty: add --resume to continue it, or set output: to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    fed = LocalFederation(out / "flower", audit=audit)
    threads = cfg.local.threads or max(1, (os.cpu_count() or 1) // orgs)
    try:
        fed.start_superlink()
        for p in parts:
            fed.start_node(p.name, p, threads)
        client = fed.client()
        wait_for_nodes(client, orgs, cfg.wait_for_nodes, fed.alive)
        run_id = submit(client, cfg)
        echo(f"run {run_id}: {orgs} organisations ({', '.join(p.name for p in parts)}), {cfg.rounds} rounds, strategy {cfg.strategy}; logs in {fed.workdir / 'logs'}")
        try:
            status = follow(client, run_id, echo, alive=fed.alive)
        except KeyboardInterrupt:
            stop_run(client, run_id)
            raise
        if status != "finished:completed":
            raise PluralError(f"the federation ended as {status}; see {fed.workdir / 'logs'} and {out / 'progress.jsonl'}")
    finally:
        fed.stop()
    return out / "adapter"

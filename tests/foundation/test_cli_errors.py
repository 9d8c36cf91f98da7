"""Every `plural` command, run through the real executable on bad input, exits non-zero with a
message that names what is wrong and no traceback (issue 11: `data check` on a bad file exited 0;
`models add` of a damaged file printed struct.error / SafetensorError tracebacks).

The commands are discovered from the Typer app, so a new command without a case here fails
`test_every_command_has_a_bad_input_case`. Each case runs against an empty store (PLURAL_HOME),
so no model is ever loaded: each check that comes first is what is tested.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import pytest
import typer.main
import yaml

PLURAL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "plural"

# (command, arguments, text the output must contain). In arguments, files named here are made by
# `bad_files`; "{d}" is that folder. Output is compared with whitespace collapsed (Rich wraps lines).
CASES: list[tuple[str, list[str], str]] = [
    ("tune", ["missing.yaml"], "missing.yaml: no such config file"),
    ("tune", ["bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("tune", ["unknown_key.yaml"], "unknown_key.yaml: lora.rank: unknown key"),
    ("tune", ["no_data.yaml"], "data file {d}/nothing.jsonl not found"),
    ("tune", ["tune.yaml", "--set", "data.train=folder"], "data file {d}/folder is a folder"),  # --set: relative to the cwd
    ("tune", ["tune.yaml", "--set", "output=a_file"], "output: {d}/a_file is a file, not a run folder"),
    ("tune", ["tune.yaml", "--set", "train.batch_size=0"], "train.batch_size: Input should be greater than or equal to 1"),
    ("tune", ["tune.yaml"], "model 'nope' is not in the store"),
    ("tune", ["--resume", "folder"], "folder: not a run folder (no config.yaml)"),
    ("generate", ["--model", "nope", "hi"], "model 'nope' is not in the store"),
    ("chat", ["--model", "nope"], "model 'nope' is not in the store"),
    ("demo", ["--config", "missing.yaml"], "missing.yaml: demo config not found"),
    ("eval", ["bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("eval", ["unknown_key.yaml"], "unknown_key.yaml: data: unknown key"),
    ("eval", ["--suite", "missing.jsonl"], "missing.jsonl: no such file"),
    ("serve", ["--config", "bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("serve", ["--host", "0.0.0.0"], "without API keys the server binds 127.0.0.1 only"),
    ("serve", ["--max-prefill-tokens", "-1"], "max_prefill_tokens: Input should be greater than or equal to 0"),
    ("console", ["--model", "nope"], "model 'nope' is not in the store"),
    ("console", ["--config", "bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("models add", ["four_bytes.gguf"], "four_bytes.gguf: damaged or truncated GGUF file"),
    ("models add", ["not_gguf.gguf"], "not_gguf.gguf: not a GGUF file"),
    ("models add", ["hf"], "hf/model.safetensors: damaged or truncated safetensors file"),
    ("models add", ["missing"], "missing: no such file or folder"),
    ("models add", ["bad.jsonl"], "bad.jsonl: expected a .gguf file or a Hugging Face model folder"),
    ("models add", [], "give either PATH or --default"),
    ("models list", ["--store", "broken"], "plural-model.json: unreadable manifest"),
    ("models show", ["nope"], "model 'nope' is not in the store"),
    ("models remove", ["nope"], "model 'nope' is not in the store"),
    ("data check", ["bad.jsonl", "--no-tokens"], "bad.jsonl:1: error [schema] 'messages' must be a non-empty list"),
    ("data check", ["missing.jsonl"], "missing.jsonl: no such file"),
    ("data check", ["bad.jsonl", "--config", "bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("values check", ["bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("values check", ["missing.yaml"], "missing.yaml"),
    ("values compile", ["bad.yaml", "-o", "out"], "bad.yaml:2: not valid YAML"),
    ("values eval", ["bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("federate local", ["bad.yaml", "--orgs", "2"], "bad.yaml:2: not valid YAML"),
    ("federate local", ["unknown_key.yaml", "--orgs", "2"], "unknown_key.yaml: data: unknown key"),
    ("federate run", ["bad.yaml", "--superlink", "127.0.0.1:1", "--insecure"], "bad.yaml:2: not valid YAML"),
    ("federate run", ["fed.yaml", "--superlink", "127.0.0.1:1", "--root-certificates", "missing.pem"], "--root-certificates missing.pem: no such file"),
    ("federate superlink", ["--tls", "folder"], "folder/ca.pem: missing"),
    ("federate superlink", ["--insecure", "--database", "a_file/state.db"], "--database a_file: cannot create the folder"),
    ("federate certs", ["a_file", "--host", "127.0.0.1"], "OUT_DIR a_file: cannot create the folder"),
    ("federate certs", ["out", "--host", "bad host!"], "--host 'bad host!': not an IP address or a DNS name"),
    ("federate allow-node", ["missing.pub", "--superlink", "127.0.0.1:1", "--root-certificates", "missing.pem"], "PUBLIC_KEY missing.pub: no such file"),
    ("node start", ["--superlink", "127.0.0.1:1", "--data", "folder", "--insecure"], "folder: a node's data folder must hold train.jsonl"),
    ("node start", ["--superlink", "127.0.0.1:1", "--data", "org", "--root-certificates", "missing.pem"], "--root-certificates missing.pem: no such file"),
    ("node keygen", ["a_file"], "OUT_DIR a_file: cannot create the folder"),
    ("node keygen", ["keys", "--name", "node"], "keys/node already exists"),
    ("export gguf-lora", ["missing-adapter", "-o", "out.gguf"], "adapter 'missing-adapter' not found"),
    ("export gguf", ["nope", "-o", "out.gguf"], "'nope' is neither an adapter"),
    ("export ollama", ["nope", "-o", "out"], "'nope' is neither an adapter"),
    ("export hf", ["nope", "-o", "out"], "'nope' is neither an adapter"),
    ("keys new", ["bad name!"], "invalid key name 'bad name!'"),
    ("keys list", ["--bogus"], "No such option '--bogus'"),  # takes no input but its options
    ("keys export", ["nope"], "no key 'nope'"),
    ("adapters sign", ["missing-adapter", "--key", "nope"], "adapter 'missing-adapter' not found"),
    ("adapters verify", ["folder", "--trust", "missing.yaml"], "not an adapter folder"),
    ("adapters list", ["--trust", "missing.yaml"], "missing.yaml: no such trust file or public key"),
    ("adapters show", ["nope"], "adapter 'nope' not found"),
    ("adapters push", ["missing-adapter", "127.0.0.1:1/x:1"], "adapter 'missing-adapter' not found"),
    ("adapters pull", ["not a ref"], "reference 'not a ref': expected HOST[:PORT]/REPOSITORY[:TAG]"),
]


def commands() -> set[str]:
    from plural.cli.main import app

    def walk(cmd: click.Command, prefix: tuple[str, ...] = ()):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, prefix + (name,))
        else:
            yield " ".join(prefix)

    return set(walk(typer.main.get_command(app)))


def test_every_command_has_a_bad_input_case():
    missing = sorted(commands() - {c for c, _, _ in CASES})
    assert not missing, f"add a bad-input case to CASES for: {', '.join(missing)}"
    assert not {c for c, _, _ in CASES} - commands(), "a case names a command that does not exist"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    (d / "home").mkdir()  # an empty store
    (d / "broken" / "models" / "m").mkdir(parents=True)
    (d / "broken" / "models" / "m" / "plural-model.json").write_text("{")
    (d / "bad.yaml").write_text("a: [\n")
    (d / "unknown_key.yaml").write_text(yaml.safe_dump({"data": {"train": "x.jsonl"}, "lora": {"rank": 8}}))
    (d / "bad.jsonl").write_text('{"messages": 3}\n')
    (d / "good.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}\n')
    (d / "no_data.yaml").write_text(yaml.safe_dump({"data": {"train": "nothing.jsonl"}}))
    (d / "tune.yaml").write_text(yaml.safe_dump({"model": "nope", "data": {"train": "good.jsonl"}, "output": "run"}))
    (d / "fed.yaml").write_text("rounds: 1\n")
    (d / "four_bytes.gguf").write_bytes(b"GGUF")
    (d / "not_gguf.gguf").write_bytes(b"PK\x03\x04 this is a zip file, not GGUF")
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text('{"model_type": "llama"}')
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(256)}, str(d / "hf" / "model.safetensors"))
    with open(d / "hf" / "model.safetensors", "r+b") as f:  # cut off half of the tensor data
        f.truncate((d / "hf" / "model.safetensors").stat().st_size // 2)
    (d / "folder").mkdir()
    (d / "org").mkdir()
    (d / "org" / "train.jsonl").write_text((d / "good.jsonl").read_text())
    (d / "keys").mkdir()
    (d / "keys" / "node").write_text("an existing private key")
    (d / "a_file").write_text("not a folder")
    return d


@pytest.mark.parametrize("command, args, needle", CASES, ids=[f"{c}:{' '.join(a)}" for c, a, _ in CASES])
def test_bad_input_fails_cleanly(bad_files, command, args, needle):
    d = bad_files
    home = d / "home"
    if args[:1] == ["--store"]:  # a case about the store itself
        home, args = d / args[1], args[2:]
    env = {**os.environ, "PLURAL_HOME": str(home), "FLWR_HOME": str(d / "flwr")}
    r = subprocess.run([str(PLURAL), *command.split(), *args], capture_output=True, text=True, cwd=d, env=env, timeout=120)
    said = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0, said[-2000:]
    assert needle.replace("{d}", str(d)) in said, said[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (d / "run").exists()  # a failed `tune` leaves no run folder behind

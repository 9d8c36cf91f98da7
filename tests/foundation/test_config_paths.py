"""One path rule for every config file: relative paths inside a config file are relative to its
folder; paths on the command line (options, `--set`) are relative to the working directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from plural.config import load_config
from plural.errors import PluralError
from plural.evaluate.run import AdapterSpec, EvalConfig, SuiteSpec
from plural.federate.config import FederateConfig
from plural.serve.settings import load_settings
from plural.tune.config import TuneConfig

from .helpers import chat_rows, write_jsonl

PLURAL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "plural"


@pytest.fixture
def two_folders(tmp_path, monkeypatch):
    """conf/ holds the config files; the process runs in work/, which holds decoys of the same names."""
    conf, work = tmp_path / "conf", tmp_path / "work"
    conf.mkdir()
    work.mkdir()
    for name in ("train.jsonl", "eval.jsonl"):  # the old rule preferred these when they existed
        write_jsonl(work / name, chat_rows(2))
        write_jsonl(conf / name, chat_rows(2))
    monkeypatch.chdir(work)
    return conf.resolve(), work.resolve()


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_tune_config_paths_follow_the_file_and_set_follows_the_cwd(two_folders):
    conf, work = two_folders
    f = _yaml(conf / "tune.yaml", {"method": "dpo", "init_adapter": "runs/sft/adapter",
                                   "data": {"train": "train.jsonl", "eval": "eval.jsonl"}, "output": "runs/dpo"})
    cfg = load_config(TuneConfig, Path("..") / "conf" / "tune.yaml")
    assert cfg.data.train == [conf / "train.jsonl"] and cfg.data.eval == conf / "eval.jsonl"
    assert cfg.output == conf / "runs" / "dpo" and cfg.init_adapter == conf / "runs" / "sft" / "adapter"
    cfg = load_config(TuneConfig, f, ["data.train=[train.jsonl, ../x.jsonl]", "output=out", "init_adapter=a/b"])
    assert cfg.data.train == [work / "train.jsonl", work.parent / "x.jsonl"]
    assert cfg.output == work / "out" and cfg.init_adapter == work / "a" / "b"
    assert cfg.data.eval == conf / "eval.jsonl"  # not overridden: still the file's
    # A key left out takes its default as if written in the file; absolute paths stay as given.
    cfg = load_config(TuneConfig, _yaml(conf / "t2.yaml", {"data": {"train": str(work / "train.jsonl")}}))
    assert cfg.output == conf / "runs" / "run" and cfg.data.train == [work / "train.jsonl"]


def test_federate_eval_and_serve_configs_follow_the_same_rule(two_folders):
    conf, work = two_folders
    fed = load_config(FederateConfig, _yaml(conf / "fed.yaml", {"partitions": ["orgs/a", "orgs/b"], "output": "runs/fed"}),
                      ["partitions=[here]"])
    assert fed.partitions == [work / "here"] and fed.output == conf / "runs" / "fed"

    (conf / "sft").mkdir()  # a bare name that exists beside the config is a folder there
    ev = load_config(EvalConfig, _yaml(conf / "eval.yaml", {
        "adapters": ["runs/a/adapter", "support-v3", "sft", {"name": "b", "path": "b/adapter"}],
        "suites": ["qa:train.jsonl", "eval.jsonl", {"path": "s.jsonl", "kind": "samples"}],
        "output": "report", "model": "smollm2-135m-instruct"}))
    assert ev.adapters == [str(conf / "runs/a/adapter"), "support-v3", str(conf / "sft"), AdapterSpec(name="b", path=str(conf / "b/adapter"))]
    assert ev.suites == [f"qa:{conf / 'train.jsonl'}", str(conf / "eval.jsonl"), SuiteSpec(path=conf / "s.jsonl", kind="samples")]
    assert ev.output == conf / "report" and ev.model == "smollm2-135m-instruct"
    assert load_config(EvalConfig, conf / "eval.yaml", ["output=here"]).output == work / "here"

    s = load_settings(_yaml(conf / "serve.yaml", {"adapters": {"legal": "adapters/legal", "ops": "ops-v2"}, "adapter_dirs": ["adapters"]}),
                      adapters={"cli": "mine/adapter"})
    assert s.adapters == {"legal": str(conf / "adapters/legal"), "ops": "ops-v2", "cli": "mine/adapter"}  # the flag's: cwd
    assert s.adapter_dirs == [str(conf / "adapters")]


def test_wrong_shapes_still_fail_validation_naming_the_key(two_folders):
    conf, _ = two_folders
    with pytest.raises(PluralError, match=r"t.yaml: data.train.0: Input is not a valid path"):
        load_config(TuneConfig, _yaml(conf / "t.yaml", {"data": {"train": [{"a": 1}]}}))
    with pytest.raises(PluralError, match=r"t.yaml: output: Input is not a valid path"):
        load_config(TuneConfig, _yaml(conf / "t.yaml", {"data": {"train": "x"}, "output": 3}))


def test_plural_tune_run_from_another_folder(two_folders, tiny_model):
    """The real executable, a config in conf/ run from work/: the data beside the config is trained
    on (not work/'s decoy), `output:` lands beside the config, a --set output lands in the cwd."""
    conf, work = two_folders
    write_jsonl(conf / "train.jsonl", chat_rows(8))  # 8 rows beside the config, 2 in the decoy
    cfg = _yaml(conf / "tune.yaml", {"model": tiny_model, "data": {"train": "train.jsonl", "max_length": 128},
                                     "lora": {"r": 2, "alpha": 4}, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
                                     "output": "runs/a"})
    env = {**os.environ, "PLURAL_HOME": os.environ["PLURAL_HOME"]}
    r = subprocess.run([str(PLURAL), "tune", "../conf/tune.yaml"], capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((conf / "runs" / "a" / "adapter" / "plural.json").read_text())
    from plural.tune.sft import REPLAY

    # the config's file, resolved from its own folder, and the sft recipe's replayed general text
    assert [d["path"] for d in man["data"]] == [str(conf / "train.jsonl"), str(REPLAY)]
    saved = yaml.safe_load((conf / "runs" / "a" / "config.yaml").read_text())
    assert saved["output"] == str(conf / "runs" / "a") and saved["data"]["train"] == [str(conf / "train.jsonl")]
    r = subprocess.run([str(PLURAL), "tune", str(cfg), "--set", "output=mine"], capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "mine" / "adapter" / "adapter_model.safetensors").is_file()

"""Model store: import (HF folder, GGUF), manifest, fingerprint, errors, atomicity."""

from __future__ import annotations

import json

import pytest

from plural.errors import PluralError
from plural.store import models as store_models
from plural.store.models import fingerprint_dir, get_model, import_model, list_models, remove_model

from .test_tune import run_cli


def test_default_model_manifest(smollm2):
    m = get_model()  # no name: the default
    assert m.name == smollm2
    man = m.manifest
    assert man["architecture"] == "LlamaForCausalLM" and man["dtype"] == "float32"
    assert 130e6 < man["parameters"] < 140e6 and man["eos_token"] == "<|im_end|>"
    assert man["fingerprint"] == fingerprint_dir(m.path)  # the weights on disk are the fingerprinted ones
    assert (m.path / "model.safetensors").is_file() and (m.path / "chat_template.jinja").is_file()


def test_import_folder_list_show_remove(tmp_path, monkeypatch, store):
    src = get_model("tiny").path  # an HF folder with safetensors
    monkeypatch.setenv("PLURAL_HOME", str(tmp_path / "home"))
    m = import_model(src, name="mini")
    assert [x.name for x in list_models()] == ["mini"]
    with pytest.raises(PluralError, match="already in the store"):
        import_model(src, name="mini")
    r = run_cli("models", "show", "mini")
    assert r.returncode == 0 and json.loads(r.stdout)["fingerprint"] == m.fingerprint
    r = run_cli("models", "list")
    assert r.returncode == 0 and "mini" in r.stdout
    remove_model("mini")
    assert list_models() == []
    with pytest.raises(PluralError, match="plural models add PATH --name mini"):
        get_model("mini")


def test_refuses_pickle_only_folders_and_bad_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PLURAL_HOME", str(tmp_path / "home"))
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(PluralError, match="never unpickles"):
        import_model(d)
    with pytest.raises(PluralError, match="invalid model name"):
        import_model(d, name="../escape")
    with pytest.raises(PluralError, match="expected a .gguf file"):
        import_model(d / "config.json")


def test_failed_import_leaves_nothing_behind(tmp_path, monkeypatch, store):
    src = get_model("tiny").path
    monkeypatch.setenv("PLURAL_HOME", str(tmp_path / "home"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_models, "write_json_atomic", boom)
    with pytest.raises(OSError):
        import_model(src, name="half")
    assert not any((tmp_path / "home" / "models").iterdir())  # no partial folder, no temp folder


def test_gguf_import_parses_the_file_once_and_keeps_the_weights(tmp_path, monkeypatch, store):
    # transformers' GGUF loader parses the file again for the tokenizer, the config and the weights;
    # import_model makes that one parse (store.models._gguf_parsed_once: ~10 s of `make demo`).
    import gguf
    import torch
    from safetensors.torch import load_file

    from plural.export.gguf_model import export_gguf
    from plural.export.source import open_source

    src = get_model("tiny")
    out = tmp_path / "tiny.gguf"
    export_gguf(open_source("tiny"), out, "f32")
    parses = []
    real = gguf.GGUFReader

    def counting(path, mode="r"):
        parses.append(str(path))
        return real(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    monkeypatch.setenv("PLURAL_HOME", str(tmp_path / "home"))
    m = import_model(out, name="from-gguf")
    assert len(parses) == 1
    assert gguf.GGUFReader is counting  # restored after the import
    a, b = load_file(src.path / "model.safetensors"), load_file(m.path / "model.safetensors")
    assert set(b) <= set(a) and all(torch.equal(a[k], b[k]) for k in b)  # f32 round trip: the same weights

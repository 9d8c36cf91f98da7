"""The adapter manifest (plural.json) as one typed model: written by build_manifest/save_adapter,
read by load_manifest; read_manifest keeps returning the plain object other readers use."""

from __future__ import annotations

import json

import pytest

from plural.errors import PluralError
from plural.store.adapters import CONFIG, MANIFEST, WEIGHTS, AdapterManifest, Metrics, load_manifest, read_manifest


def fake_adapter(tmp_path, manifest: dict | None, name: str = "ad"):
    d = tmp_path / name
    d.mkdir()
    (d / CONFIG).write_text("{}")
    (d / WEIGHTS).write_bytes(b"")
    if manifest is not None:
        (d / MANIFEST).write_text(json.dumps(manifest))
    return d


def test_manifest_round_trip_keeps_typed_fields_and_unknown_keys(tmp_path):
    m = AdapterManifest(method="sft", base={"name": "tiny", "fingerprint": "sha256:ab"}, created="2026-12-01T00:00:00Z",
                        metrics=Metrics(steps=3, eval_loss=1.5, warnings=["w"], **{"lambda": 0.1}), run="runs/x",
                        signature_hint="kept")  # a key this version does not know
    d = fake_adapter(tmp_path, m.to_json())
    back = load_manifest(d)
    assert back.metrics.steps == 3 and back.metrics.lambda_ == 0.1 and back.base.fingerprint == "sha256:ab"
    assert back.model_extra == {"signature_hint": "kept"}
    raw = read_manifest(d)  # the plain object: unset fields left out, the orpo weight under its JSON name
    assert raw["metrics"]["lambda"] == 0.1 and "train_loss" not in raw["metrics"] and raw["signature_hint"] == "kept"


def test_malformed_manifest_names_file_and_field(tmp_path):
    d = fake_adapter(tmp_path, {"method": "sft", "base": {"name": "tiny"}, "created": "x", "metrics": {"steps": "many"}})
    with pytest.raises(PluralError, match=r"ad/plural.json: metrics.steps: Input should be a valid integer"):
        load_manifest(d)
    d2 = fake_adapter(tmp_path, {"method": "sft", "created": "x"}, "b")
    with pytest.raises(PluralError, match=r"plural.json: base: Field required"):
        load_manifest(d2)
    assert load_manifest(fake_adapter(tmp_path, None, "c")) is None  # an adapter made outside plural

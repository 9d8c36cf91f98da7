"""Check answers against the response schemas of OpenAI's OpenAPI spec (openai_spec/schemas.json,
cut from github.com/openai/openai-openapi by openai_spec/extract.py; MIT licence)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema_rs

SCHEMAS = json.loads((Path(__file__).parent / "openai_spec" / "schemas.json").read_text())


@cache
def _validator(name: str):
    return jsonschema_rs.Draft202012Validator({"$defs": SCHEMAS["$defs"], "$ref": f"#/$defs/{name}"})


def check(name: str, obj: dict) -> None:
    """Assert obj validates against the spec's schema `name`, naming every violation."""
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in _validator(name).iter_errors(obj)]
    assert not errors, f"{name}: " + "; ".join(errors) + f"\n{json.dumps(obj)[:2000]}"


def sse_events(body: str) -> list[dict]:
    """The JSON objects of an SSE body, which must end with `data: [DONE]`."""
    lines = [ln for ln in body.split("\n") if ln]
    assert lines[-1] == "data: [DONE]", lines[-1:]
    assert all(ln.startswith("data: ") for ln in lines)
    return [json.loads(ln[6:]) for ln in lines[:-1]]

"""Cut the response schemas plural checks its answers against out of OpenAI's OpenAPI spec.

Usage: python extract.py OPENAPI.json COMMIT > schemas.json

The spec (github.com/openai/openai-openapi, MIT licence, see LICENSE here) mixes OpenAPI 3.0's
`nullable: true` into its 3.1 document; this turns it into JSON Schema's `{"type": "null"}`
alternative, points `$ref`s at `$defs`, and drops descriptions and examples.
"""

from __future__ import annotations

import json
import sys

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse", "CreateEmbeddingResponse"]
DROP = {"description", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel", "x-stainless-const", "deprecated",
        "title", "discriminator", "x-oaiExpandable"}


def convert(node):
    if isinstance(node, list):
        return [convert(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items() if k not in DROP and k != "nullable"}
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/$defs/")
    if node.get("nullable"):
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return {"anyOf": [out, {"type": "null"}]}
    return out


def main(path: str, commit: str) -> None:
    schemas = json.load(open(path))["components"]["schemas"]
    keep: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/") and (name := ref.rsplit("/", 1)[1]) not in keep:
                keep.add(name)
                walk(schemas[name])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for r in ROOTS:
        keep.add(r)
        walk(schemas[r])
    doc = {"source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json", "licence": "MIT (LICENSE)",
           "$defs": {k: convert(schemas[k]) for k in sorted(keep)}}
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""`plural export gguf-lora|gguf|ollama|hf`: the adapter leaves plural for llama.cpp, Ollama, vLLM and TGI."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, get_args

import typer
from rich.console import Console

from plural.errors import PluralError

app = typer.Typer(help="Export an adapter or model: GGUF LoRA, GGUF, Ollama folder, Hugging Face folder.", no_args_is_help=True)
out = Console()

_SOURCE = typer.Argument(..., help="An adapter (folder or store name), or a stored model name (gguf, hf --merged).")
_OUT = typer.Option(..., "-o", "--output", help="Output path.")
_FORCE = typer.Option(False, "--force", help="Replace an existing output.")


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise PluralError(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
    return value


@app.command("gguf-lora")
def gguf_lora(
    source: str = _SOURCE,
    output: Path = _OUT,
    type_: str = typer.Option("f32", "--type", help="Tensor type: f32, f16, bf16, q8_0."),
    force: bool = _FORCE,
) -> None:
    """A GGUF LoRA for llama.cpp (--lora) and Ollama (ADAPTER) on the base's GGUF."""
    from plural.export.gguf_lora import LoraType, export_gguf_lora
    from plural.export.source import open_adapter

    r = export_gguf_lora(open_adapter(source), output, _choice(type_, get_args(LoraType), "--type"), force)
    out.print(f"wrote {r['path']} ({r['tensors']} tensors, alpha {r['alpha']:g}, {r['bytes'] / 1e6:.2f} MB)")


@app.command("gguf")
def gguf_model(
    source: str = _SOURCE,
    output: Path = _OUT,
    type_: str = typer.Option("f16", "--type", help="f32, f16, bf16, q8_0, q4_0, q4_1."),
    force: bool = _FORCE,
) -> None:
    """The base, or the base with the adapter merged, as one GGUF with tokenizer and chat template."""
    from plural.export.gguf_model import ModelType, export_gguf
    from plural.export.source import open_source

    qtype = _choice(type_, get_args(ModelType), "--type")
    src = open_source(source)
    with out.status(f"writing {qtype} GGUF…"):
        r = export_gguf(src, output, qtype, force)
    out.print(f"wrote {r['path']} ({r['type']}, {r['tensors']} tensors, {r['bytes'] / 1e6:.1f} MB)")


@app.command("ollama")
def ollama(
    source: str = _SOURCE,
    output: Path = _OUT,
    type_: str = typer.Option("q8_0", "--type", help="GGUF type of the model file: f32, f16, bf16, q8_0, q4_0, q4_1."),
    adapter_layer: bool = typer.Option(False, "--adapter-layer", help="Base GGUF + GGUF LoRA (an ADAPTER line) instead of one merged GGUF."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Value profile whose system prompt becomes the Modelfile's SYSTEM."),
    create: Optional[str] = typer.Option(None, "--create", help="Run `ollama create NAME` on the folder (needs ollama on PATH)."),
    force: bool = _FORCE,
) -> None:
    """A folder Ollama imports: GGUF(s) and a Modelfile whose TEMPLATE renders like the Jinja chat template."""
    from plural.export.gguf_model import ModelType
    from plural.export.ollama import create as ollama_create
    from plural.export.ollama import export_ollama
    from plural.export.source import open_source

    qtype = _choice(type_, get_args(ModelType), "--type")
    system = None
    if profile is not None:
        from plural.values.profile import load_profile

        system = load_profile(profile).system_prompt()
    src = open_source(source)
    with out.status("writing the Ollama folder…"):
        r = export_ollama(src, output, qtype, adapter_layer, system, force)
    out.print(f"wrote {r.path}: {', '.join(r.files)}")
    if create:
        out.print(f"ollama model [bold]{ollama_create(output, create)}[/] created")


@app.command("hf")
def hf(
    source: str = _SOURCE,
    output: Path = _OUT,
    merged: bool = typer.Option(False, "--merged", help="Merged safetensors model (else the PEFT adapter for a LoRA-serving engine)."),
    base_name: Optional[str] = typer.Option(None, "--base-name", help="The base's name as the engine serves it (adapter export; default: the store name)."),
    force: bool = _FORCE,
) -> None:
    """A Hugging Face folder for vLLM, TGI or SGLang."""
    from plural.export.hf import export_hf_adapter, export_hf_merged
    from plural.export.source import open_source

    src = open_source(source)
    if merged:
        with out.status("merging and saving…"):
            r = export_hf_merged(src, output, force)
        out.print(f"wrote {r['path']} (merged; eos_token_id {r['eos_token_id']})")
    else:
        r = export_hf_adapter(src, output, base_name, force)
        out.print(f"wrote {r['path']} (PEFT adapter for base {r['base_model_name_or_path']!r})")

"""Exports measured: llama.cpp answers with plural's greedy tokens, and what quantisation costs.

1. An adapter on SmolLM2-135M-Instruct (`--adapter`, default: a PEFT-default-shaped LoRA r=8 on every
   linear layer with random B, as serve_bench makes them) is exported with `plural.export` as
   - base f32 GGUF + GGUF LoRA (llama.cpp applies the LoRA at run time),
   - the merged model as f32, q8_0, q4_0 and q4_1 GGUF.
2. The demo's held-out questions (examples/support/eval.jsonl, picked as `plural demo` picks them)
   are answered greedily (48 new tokens, stopping at the end-of-turn token) by plural (transformers +
   PEFT, fp32) and by llama.cpp (llama-cpp-python, `bench` extra) on each file, from the same prompt
   token ids (so only the weights and kernels differ, not the tokenizers). Reported: questions whose
   tokens are identical, and the mean share of the answer that agrees before the first difference.
3. Bits per byte on the bundled multilingual text (examples/eval/multilingual.jsonl) with plural's
   eval code (`plural.evaluate`), for each GGUF type read back by transformers (dequantised),
   relative to f32: of the merged model when `--adapter` is given, else of the base itself. (llama.cpp's own kernels also round activations for q8_0/q4 matrix products, so
   its bits per byte can differ slightly from the dequantised weights' figure.)

Without llama-cpp-python installed, steps 1 and 3 run and the llama.cpp rows say "not run".

    PLURAL_HOME=/tmp/ph python benchmarks/export_bench.py [--adapter PATH] [--questions 6] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _report import command, write_section

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 48
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
LLAMA_TYPES = ["f32", "q8_0", "q4_0", "q4_1"]


def random_adapter(out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    if (out / "adapter_model.safetensors").is_file():
        return out
    model, _, stored = load_model()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(1234)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.normal_(0, 1 / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.normal_(0, 0.02)
    save_adapter(pm, out, build_manifest(stored, "bench", {"seed": 1234, "lora": "random B, r=8, all-linear"}))
    return out


@torch.inference_mode()
def plural_answers(adapter: Path, prompts: list[list[int]], stop: set[int]) -> list[list[int]]:
    from plural.generation import load_for_inference

    model, tok, _ = load_for_inference(None, adapter)
    out = []
    for ids in prompts:
        g = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                           top_k=None, eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id)
        out.append(g[0, len(ids):].tolist())
    return out


def llama(model_path: Path, lora: Path | None, threads: int):
    import llama_cpp

    from _llama import load_llama

    # f32 KV cache (llama.cpp's default is f16) so that only the weights differ from plural's fp32
    return load_llama(model_path, lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=threads,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def llama_answers(llm, prompts: list[list[int]], stop: set[int]) -> list[list[int]]:
    out = []
    for ids in prompts:
        llm.reset()
        toks: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            if t in stop or len(toks) == NEW_TOKENS:
                break
        out.append(toks)
    return out


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, float]:
    same = sum(r == g for r, g in zip(ref, got))
    shares = []
    for r, g in zip(ref, got):
        k = 0
        while k < min(len(r), len(g)) and r[k] == g[k]:
            k += 1
        shares.append(k / max(len(r), 1))
    return same, sum(shares) / len(shares)


def bits_per_byte(model_name: str) -> float:
    from plural.evaluate.run import EvalConfig, evaluate

    rep = evaluate(EvalConfig(model=model_name, suites=[str(ROOT / "examples/eval/multilingual.jsonl")], bootstrap=0))
    m = next(m for m in rep["suites"][0]["metrics"] if m["name"] == "bpb")
    return next(iter(m["values"].values()))["value"]


def cpu_flags() -> str:
    """The SIMD flags that decide llama.cpp's and torch's kernels (lscpu's flags line)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, help="adapter on SmolLM2 (default: a random-B LoRA, r=8, all linear layers)")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="llama.cpp threads (1 on a machine other jobs share: its threads spin-wait for each other)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "plural-export-bench")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    args = ap.parse_args()

    from plural.data.chat import encode_prompt
    from plural.demo import pick_prompts
    from plural.export.gguf_lora import export_gguf_lora
    from plural.export.gguf_model import export_gguf
    from plural.export.source import Source, open_adapter
    from plural.export.template import end_of_turn
    from plural.store.models import import_model, load_tokenizer

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    adapter = args.adapter or random_adapter(work / "adapter")
    src = open_adapter(adapter)
    t0 = time.perf_counter()
    files = {"base-f32": work / "base-f32.gguf", "lora": work / "lora-f32.gguf"}
    export_gguf(Source(base=src.base), files["base-f32"], "f32", force=True)
    export_gguf_lora(src, files["lora"], "f32", force=True)
    for t in TYPES:
        files[t] = work / f"merged-{t}.gguf"
        export_gguf(src, files[t], t, force=True)
    # Bits per byte measure what quantisation costs the model: the merged model for a given (trained)
    # adapter, the base itself when the adapter is the random stand-in (it would only measure noise).
    bpb_files = {t: files[t] for t in TYPES}
    if args.adapter is None:
        for t in TYPES:
            bpb_files[t] = files["base-f32"] if t == "f32" else work / f"base-{t}.gguf"
            if t != "f32":
                export_gguf(Source(base=src.base), bpb_files[t], t, force=True)
    export_s = time.perf_counter() - t0
    n_files = len(set(files.values()) | set(bpb_files.values()))
    sizes = {k: p.stat().st_size / 1e6 for k, p in files.items()}

    tok = load_tokenizer(str(src.base.path))
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids(end_of_turn(tok))}
    questions = [q for q, _ in pick_prompts(ROOT / "examples/support/eval.jsonl", args.questions)]
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    print(f"exported {n_files} files in {export_s:.0f} s", flush=True)
    ref = plural_answers(src.adapter, prompts, stop)
    print("plural's answers done", flush=True)

    rows: dict[str, tuple[int, float] | None] = {}
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    runs = [("base f32 GGUF + GGUF LoRA", files["base-f32"], files["lora"])] + [(f"merged {t} GGUF", files[t], None) for t in LLAMA_TYPES]
    for label, model_path, lora in runs:
        rows[label] = agreement(ref, llama_answers(llama(model_path, lora, args.threads), prompts, stop)) if have_llama else None
        print(label, rows[label], flush=True)

    bpb = {}
    for t in TYPES:
        name = f"export-bench-{t}"
        import_model(bpb_files[t], name=name, overwrite=True)  # transformers dequantises the GGUF
        bpb[t] = bits_per_byte(name)
        print(t, "bits per byte", bpb[t], flush=True)

    n = len(prompts)
    lines = [
        "## Export: llama.cpp answers with plural's tokens; what quantisation costs",
        "",
        f"Adapter: {'`' + str(args.adapter) + '`' if args.adapter else 'random-B LoRA, r=8, all linear layers (as serve_bench makes them)'} "
        f"on SmolLM2-135M-Instruct. {n} held-out questions of the demo (examples/support/eval.jsonl), greedy, "
        f"at most {NEW_TOKENS} new tokens, stopping at the end-of-turn token, the same prompt token ids for every engine, "
        f"llama.cpp with an f32 KV cache. "
        f"Reference: plural (transformers + PEFT, fp32). Exporting all {n_files} files took {export_s:.0f} s.",
        "",
        "| llama.cpp on | file size | questions with identical tokens | answer agreeing before the first difference |",
        "|---|---|---|---|",
    ]
    for label, model_path, lora in runs:
        size = sizes[model_path.stem.replace("merged-", "")] if lora is None else sizes["base-f32"]
        size_s = f"{size:.0f} MB" + (f" + {sizes['lora']:.1f} MB" if lora else "")
        r = rows[label]
        lines.append(f"| {label} | {size_s} | " + (f"{r[0]}/{n} | {100 * r[1]:.1f}% |" if r else "not run (llama-cpp-python not installed) | |"))
    lines += [
        "",
        "Bits per byte on the bundled multilingual text (examples/eval/multilingual.jsonl, plural's eval code), "
        f"{'the merged model' if args.adapter else 'SmolLM2-135M-Instruct itself (no adapter)'}, each GGUF written by "
        "`plural export gguf` and read back by transformers (dequantised):",
        "",
        "| type | file size | bits per byte | change vs f32 |",
        "|---|---|---|---|",
    ]
    for t in TYPES:
        lines.append(f"| {t} | {bpb_files[t].stat().st_size / 1e6:.0f} MB | {bpb[t]:.4f} | {100 * (bpb[t] - bpb['f32']) / bpb['f32']:+.2f}% |")
    lines += ["", f"Command: `PLURAL_HOME=… {command()}`. CPU flags: {cpu_flags()}."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("export", body)


if __name__ == "__main__":
    main()

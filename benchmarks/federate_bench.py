"""Federated vs alone vs pooled on SmolLM2, three organisations with non-IID data.

    python benchmarks/federate_bench.py [--rounds 3 --steps 4]

Data: examples/federate/orgs/{clinic,bank,mairie} (different topics, house styles and a French
organisation); the held-out evaluation is the union of their eval.jsonl files (loss per trained
token, lower is better; "improvement" = base loss − loss).

Every run uses the node code of the real federation (client.local_train: the `plural tune`
recipe) and the server's aggregation (strategy.aggregate_round), in one process, so the only
difference between rows is who trains on what and how updates are combined:
  - alone: one organisation, the same rounds × local steps on its own data;
  - pooled: one trainer on all the data with 3 × the batch (per step, the tokens of all three
    nodes together; the same number of sequential steps and the same compute as the federation);
  - federated: 3 nodes with fedavg / exact / ffa;
  - poisoned: ffa with the bank node sending its update scaled ×50, robust aggregation
    (coordinate-wise median after clipping to the median update norm); --naive-poison adds the
    plain mean for contrast.
Bytes per round per node are the serialised Flower ArrayRecord of the tensors each way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
ORGS = ["clinic", "bank", "mairie"]


def _cache_base_model() -> None:
    """Each simulated node call gets a fresh copy of the base model from memory instead of
    reading the store again (a real node is a fresh process and reads the store; here only the
    wall time differs, not the result)."""
    import copy

    import plural.store.models as models

    load, cache = models.load_model, {}

    def cached(name=None, dtype=None, with_tokenizer=True):
        if name not in cache:
            cache[name] = load(name, dtype, with_tokenizer=True)
        model, tok, stored = cache[name]
        return copy.deepcopy(model), tok, stored

    models.load_model = cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--naive-poison", action="store_true", help="also run the poisoned federation with the plain mean")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch
    from flwr.app import ArrayRecord

    from _report import command, write_section
    from plural.federate.aggregate import State
    from plural.federate.client import local_eval, local_train
    from plural.federate.config import AggregatorConfig, FederateConfig, LocalConfig
    from plural.federate.server import initial_adapter
    from plural.federate.strategy import aggregate_round, exchanged_keys
    from plural.store.models import get_model
    from plural.tune.config import LoraConfig

    torch.set_num_threads(os.cpu_count() or 1)
    _cache_base_model()
    data = ROOT / "examples" / "federate" / "orgs"
    train = {o: data / o / "train.jsonl" for o in ORGS}
    evals = {o: data / o / "eval.jsonl" for o in ORGS}
    work = Path(tempfile.mkdtemp(prefix="plural-fedbench-"))
    base_cfg = FederateConfig(
        model=args.model, rounds=args.rounds, min_nodes=1, strategy="fedavg", seed=0,
        local=LocalConfig(steps=args.steps, batch_size=args.batch, lr=2e-3, max_length=args.max_length, device="cpu"),
        lora=LoraConfig(r=8, alpha=16, dropout=0.0), output=work / "unused",
    )
    init, fp = initial_adapter(base_cfg)

    def evaluate(cfg: FederateConfig, state: State) -> dict:
        per = {o: local_eval(cfg, state, evals[o], fp) for o in ORGS}
        n = sum(t for _, t in per.values())
        return {"all": sum(l * t for l, t in per.values()) / n, **{o: l for o, (l, _) in per.items()}}

    def federate(name: str, cfg: FederateConfig, nodes: dict[str, list[Path]], poison: str | None = None, batch: int | None = None) -> dict:
        g = dict(init)
        opt: dict = {}
        secs, up, down, trunc = [], [], [], []
        if batch:
            cfg = cfg.model_copy(update={"local": cfg.local.model_copy(update={"batch_size": batch})})
        for rnd in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            states, tokens = [], []
            down.append(ArrayRecord(torch_state_dict=g).count_bytes())
            for org, files in nodes.items():
                sent, m = local_train(cfg, g, rnd, files, None, fp)
                if org == poison:  # a faulty/malicious node: its update scaled ×50
                    sent = {k: g[k] + 50 * (v - g[k]) for k, v in sent.items()}
                up.append(ArrayRecord(torch_state_dict=sent).count_bytes())
                full = dict(g)
                full.update(sent)
                states.append(full)
                tokens.append(m["num-tokens"])
            assert set(sent) == set(exchanged_keys(cfg.strategy, g))
            g, opt, rep = aggregate_round(cfg, g, states, tokens, opt, rnd)
            if "truncation_error" in rep:
                trunc.append(rep["truncation_error"])
            secs.append(time.perf_counter() - t0)
            print(f"  {name} round {rnd}: {secs[-1]:.1f} s {json.dumps({k: v for k, v in rep.items() if k != 'update_norms'})}", flush=True)
        res = evaluate(cfg, g)
        res.update({"round_s": statistics.median(secs), "bytes_up": statistics.median(up), "bytes_down": statistics.median(down),
                    "truncation": max(trunc) if trunc else None})
        print(f"{name}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()})}", flush=True)
        return res

    t_start = time.time()
    results: dict[str, dict] = {"base": evaluate(base_cfg, init)}
    print("base:", results["base"], flush=True)
    for o in ORGS:
        results[f"alone: {o}"] = federate(f"alone {o}", base_cfg, {o: [train[o]]})
    results["pooled"] = federate("pooled", base_cfg, {"all": [train[o] for o in ORGS]}, batch=3 * base_cfg.local.batch_size)
    all_nodes = {o: [train[o]] for o in ORGS}
    for strat in ("fedavg", "exact", "ffa"):
        results[f"federated: {strat}"] = federate(strat, base_cfg.model_copy(update={"strategy": strat}), all_nodes)
    ffa = base_cfg.model_copy(update={"strategy": "ffa"})
    robust = ffa.model_copy(update={"aggregator": AggregatorConfig(rule="median", clip_norm="auto")})
    if args.naive_poison:
        results["poisoned ×50: ffa, mean"] = federate("poisoned mean", ffa, all_nodes, poison="bank")
    results["poisoned ×50: ffa, median + clip"] = federate("poisoned robust", robust, all_nodes, poison="bank")
    minutes = (time.time() - t_start) / 60

    stored = get_model(args.model)
    model_bytes = sum(f.stat().st_size for f in stored.path.glob("*.safetensors"))
    base = results["base"]["all"]
    gain = lambda r: base - r["all"]
    pooled_gain = gain(results["pooled"])
    rows = []
    for name, r in results.items():
        g = gain(r)
        rows.append(f"| {name} | {r['all']:.4f} | {g:+.4f} | {100 * g / pooled_gain:.0f}% | "
                    + " | ".join(f"{r[o]:.4f}" for o in ORGS)
                    + (f" | {r['bytes_up'] / 1e6:.2f} / {r['bytes_down'] / 1e6:.2f} MB | {100 * r['bytes_up'] / model_bytes:.2f}%" if "bytes_up" in r else " | - | -")
                    + (f" | {r['truncation']:.3f}" if r.get("truncation") is not None else " | -") + " |")
    best_fed = max(gain(results["federated: exact"]), gain(results["federated: ffa"]))
    clean = gain(results["federated: ffa"])
    robust_keep = gain(results["poisoned ×50: ffa, median + clip"]) / clean if clean else float("nan")
    naive = results.get("poisoned ×50: ffa, mean")
    naive_txt = f" (naive mean: {100 * gain(naive) / clean:.0f}%)" if naive and clean else ""
    alone_vs_fed = {o: (results[f"alone: {o}"]["all"], min(results[f"federated: {s}"]["all"] for s in ("exact", "ffa"))) for o in ORGS}
    every_gains = all(f < a for a, f in alone_vs_fed.values())
    own = {o: (results[f"alone: {o}"][o], min(results[f"federated: {s}"][o] for s in ("exact", "ffa"))) for o in ORGS}
    up_pct = max(100 * results[f"federated: {s}"]["bytes_up"] / model_bytes for s in ("fedavg", "exact", "ffa"))

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    md = f"""### Federated LoRA (`plural federate`): alone vs federated vs pooled

`{command()}` — SmolLM2-135M-Instruct, LoRA r=8 on all projections, {args.rounds} rounds × {args.steps} local steps
(batch {args.batch} × {args.max_length} tokens, lr 2e-3), three organisations with non-IID data (`examples/federate/orgs`: clinic,
bank and a French town hall). Held-out loss per trained token on the union of the three eval sets (and per
organisation); improvement is over the base model; pooled = one trainer on all the data with 3 × the
batch (the three nodes' tokens per step; same sequential steps and compute as the federation). Each run is the real node and server code
(`client.local_train`, `strategy.aggregate_round`) in one process; bytes are the serialised Flower
`ArrayRecord` per node per round (up = node → server, down = server → node), against the base model's
{model_bytes / 1e6:.0f} MB of safetensors. One seed per row; total {minutes:.0f} min.

| run | held-out loss | improvement | of pooled | {' | '.join(ORGS)} | bytes/round/node up / down | up vs model | truncation error |
|---|---|---|---|{'---|' * len(ORGS)}---|---|---|
{chr(10).join(rows)}

Targets:
- federated exact or ffa reaches ≥ 95% of the pooled improvement: {100 * best_fed / pooled_gain:.0f}% — {mark(best_fed >= 0.95 * pooled_gain)};
- every organisation gains over training alone (held-out loss on all organisations' data, alone → best of exact/ffa):
  {', '.join(f'{o} {a:.4f} → {f:.4f}' for o, (a, f) in alone_vs_fed.items())} — {mark(every_gains)};
  on its own eval set only: {', '.join(f'{o} {a:.4f} → {f:.4f}' for o, (a, f) in own.items())};
- bytes per round per node ≤ 2% of the full model: {up_pct:.2f}% — {mark(up_pct <= 2)};
- with the bank's update scaled ×50, robust aggregation keeps ≥ 90% of the clean (ffa) improvement:
  {100 * robust_keep:.0f}%{naive_txt} — {mark(robust_keep >= 0.9)}.
"""
    print(md)
    if not args.no_write:
        write_section("federate", md)


if __name__ == "__main__":
    main()

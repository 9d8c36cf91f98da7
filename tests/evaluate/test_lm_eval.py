"""plural as an lm-evaluation-harness model type, on tasks defined from local files (tests/evaluate/lm_eval_tasks).

The reference is lm-eval's own `hf` model on the same weights: plural must give the same
log-likelihoods (multiple choice), rolling log-likelihoods (bits per byte) and generations.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    d = tmp_path / "tasks"
    shutil.copytree(TASKS, d)
    monkeypatch.chdir(d)  # the task YAMLs name their data file relative to the working folder
    return d


def _run(model, model_args, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import plural.evaluate.lm_eval_model  # noqa: F401  registers "plural"

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["plural_choice", "plural_rolling", "plural_gen"],
                                   task_manager=TaskManager(include_path=str(task_dir)), log_samples=True, batch_size=4)


def test_plural_model_matches_lm_eval_hf_on_the_same_weights(tiny_model, task_dir):
    from plural.store.models import get_model

    ours = _run("plural", f"model={tiny_model}", task_dir)
    ref = _run("hf", f"pretrained={get_model(tiny_model).path},dtype=float32,device=cpu", task_dir)
    for task, metric in [("plural_choice", "acc,none"), ("plural_choice", "acc_norm,none"), ("plural_rolling", "bits_per_byte,none"),
                         ("plural_rolling", "word_perplexity,none"), ("plural_gen", "exact_match,none")]:
        assert ours["results"][task][metric] == pytest.approx(ref["results"][task][metric], rel=1e-4), (task, metric)
    # the per-choice log-likelihoods themselves, not only the argmax
    ll = lambda r: [x[0][0] for s in r["samples"]["plural_choice"] for x in s["resps"]]
    assert ll(ours) == pytest.approx(ll(ref), abs=1e-3)
    gen = lambda r: [s["filtered_resps"][0] for s in r["samples"]["plural_gen"]]
    assert gen(ours) == gen(ref)
    assert all("\n" not in g for g in gen(ours))


def test_plain_lm_eval_command_runs_plural_with_an_adapter(tiny_model, tiny_adapters, task_dir, tmp_path):
    # lm-eval's own command, unwrapped: `make install` put plural's registry hook (.pth) in place.
    exe = Path(sys.executable).parent / "lm_eval"
    out = tmp_path / "out"
    r = subprocess.run([str(exe), "run", "--model", "plural", "--model_args", f"model={tiny_model},adapter={tiny_adapters[0]}",
                        "--tasks", "plural_choice", "--include_path", str(task_dir), "--output_path", str(out)],
                       capture_output=True, text=True, cwd=task_dir, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= res["results"]["plural_choice"]["acc,none"] <= 1.0
    assert f"adapter={tiny_adapters[0]}" in res["config"]["model_args"] or str(tiny_adapters[0]) in json.dumps(res["config"])


def test_registry_hook_is_lazy_and_keeps_lm_evals_own_types(tmp_path):
    from plural.evaluate.lm_eval_hook import PTH_LINE, install_pth

    pth = install_pth(tmp_path)
    assert pth.read_text() == PTH_LINE
    code = ("import site, sys; site.addsitedir(sys.argv[1]); "
            "heavy = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]; "
            "from lm_eval.api.registry import get_model; "
            "print(heavy, get_model('plural').__name__, get_model('hf').__name__)")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "PluralLM", "HFLM"]

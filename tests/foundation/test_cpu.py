"""plural.cpu: the CPU kind every dtype and kernel choice follows, and its environment caps (issue 19)."""

import json
import os
import subprocess
import sys

PROBE = ("import json, torch; from plural.cpu import cpu_info; from plural.serve.app import pick_dtype; "
         "from plural.tune.loop import autocast_dtype; c = cpu_info(); "
         "print(json.dumps({'kind': c.kind, 'flags': c.flags, 'caps': c.caps, 'fast_bf16': c.fast_bf16, "
         "'serve': str(pick_dtype('auto', torch.device('cpu'))), "
         "'tune': str(autocast_dtype('auto', torch.device('cpu')))}))")


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def flags():
    text = open("/proc/cpuinfo").read()
    line = next(l for l in text.splitlines() if l.startswith("flags"))
    return set(line.split(":", 1)[1].split())


def test_kind_follows_the_flags_and_dtype_choices_follow_the_kind():
    have = flags()
    got = probe()
    assert got["caps"] == []
    expected = ("amx" if "amx_bf16" in have else "avx512_bf16" if "avx512_bf16" in have else
                "avx512" if "avx512f" in have else "avx2" if "avx2" in have else "baseline")
    assert got["kind"] == expected
    assert got["fast_bf16"] == (expected in ("amx", "avx512_bf16"))
    # serving and training pick bf16 exactly where the kind has native bf16, else fp32
    assert got["serve"] == ("torch.bfloat16" if got["fast_bf16"] else "torch.float32")
    assert got["tune"] == ("torch.bfloat16" if got["fast_bf16"] else "None")


def test_capping_torchs_kernels_to_avx2_makes_every_choice_an_avx2_machine_would():
    got = probe(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert got["kind"] in ("avx2", "baseline")
    assert not got["fast_bf16"]
    assert got["serve"] == "torch.float32" and got["tune"] == "None"
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in got["caps"]
    # one cap is enough to lose native bf16: oneDNN capped below AVX512_CORE_BF16
    assert probe(ONEDNN_MAX_CPU_ISA="AVX512_CORE")["fast_bf16"] is False


def test_unknown_cap_values_cap_nothing():
    assert probe(ONEDNN_MAX_CPU_ISA="NOT_AN_ISA")["kind"] == probe()["kind"]

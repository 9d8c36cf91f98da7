"""The console in a real browser (headless Chromium via Playwright) against a real `plural serve`
process: compare streams, adapters per tenant, runs and reports with bad input, offline page."""

from __future__ import annotations

import httpx
import pytest
from console_site import ACME_KEY, ADMIN_KEY, BETA_KEY, SYSTEM_ACME

pytestmark = pytest.mark.e2e


def api(server, path: str, key: str, **kw):
    return httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def greedy(server, model: str, prompt: str, key: str = ADMIN_KEY) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0, "seed": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_compare_streams_two_variants_side_by_side(watched, console_server):
    page = watched.open(ADMIN_KEY, "compare")
    for box in page.query_selector_all("#variants input"):
        box.set_checked(box.get_attribute("value") in ("tiny", "acme-support"))
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Hello, who are you?")
    page.click("#run")
    page.wait_for_selector("#compare-status:text('done')", timeout=30_000)
    answers = {c.get_attribute("data-model"): c.inner_text() for c in page.query_selector_all(".answer")}
    # Each column shows what the API answers, non-streamed, for the same prompt and sampling.
    assert answers == {"tiny": greedy(console_server, "tiny", "Hello, who are you?"),
                       "acme-support": greedy(console_server, "acme-support", "Hello, who are you?")}
    assert answers["tiny"] != answers["acme-support"]
    for stats in page.query_selector_all(".column .stats"):
        text = stats.inner_text()
        assert "12 tokens" in text and "tok/s" in text, text
    # The differences are marked: the tiny base answers only newlines, so every word of the
    # adapter's answer is marked, and nothing in the base's column.
    marked = [m.inner_text() for m in page.query_selector_all(".column[data-model='acme-support'] mark")]
    assert answers["tiny"].strip() == "" and "".join(marked).split() == answers["acme-support"].split()
    assert page.query_selector_all(".column[data-model='tiny'] mark") == []
    assert f"{len(marked)} word(s) differ from tiny" in page.inner_text(".column[data-model='acme-support'] .stats")
    # the adapter's value-profile system prompt is shown in its column; the base has none
    assert SYSTEM_ACME in page.inner_text(".column[data-model='acme-support'] details.system pre")
    assert "no system prompt" in page.inner_text(".column[data-model='tiny']")
    # streamed: the page read /v1/chat/completions itself, one POST per column
    assert sum(u.endswith("/v1/chat/completions") for u in watched.requests) == 2
    watched.shot("compare")


def test_compare_refuses_fewer_than_two_variants(watched):
    page = watched.open(ADMIN_KEY, "compare")
    for box in page.query_selector_all("#variants input"):
        box.set_checked(box.get_attribute("value") == "tiny")
    page.fill("#prompt", "Hi")
    page.click("#run")
    assert "Pick 2 to 4 variants" in page.inner_text("#notice")
    assert page.query_selector_all(".column") == []


@pytest.mark.parametrize("key", [ADMIN_KEY, ACME_KEY, BETA_KEY])
def test_adapters_table_lists_what_v1_models_lists(watched, console_server, key):
    page = watched.open(key, "adapters")
    page.wait_for_selector("#adapters-table tbody tr")
    shown = [r.get_attribute("data-model") for r in page.query_selector_all("#adapters-table tbody tr")]
    listed = [m["id"] for m in api(console_server, "/v1/models", key).json()["data"]]
    assert shown == listed
    if key == ADMIN_KEY:
        row = page.inner_text("#adapters-table tr[data-model='acme-support']")
        assert "sft" in row and "eval_loss = 1.4560" in row  # method and metrics from plural.json
        data = api(console_server, "/console/api/adapters", key).json()[1]["data"][0]
        assert data["sha256"][:19] in row
        assert "unsigned" in row and "KiB" in row  # trust and size on disk
        # signed (plural adapters sign), but this server does not check signatures (no --require-signed)
        assert "signed, not verified" in page.inner_text("#adapters-table tr[data-model='beta-legal']")
        assert SYSTEM_ACME[:20] in row
        assert page.is_visible("#load-form")  # load/unload for the admin key
        watched.shot("adapters")
    else:
        assert not page.is_visible("#load-form")


def test_tenant_key_does_not_see_another_tenants_adapter(watched, console_server):
    page = watched.open(ACME_KEY, "compare")
    variants = [b.get_attribute("value") for b in page.query_selector_all("#variants input")]
    assert variants == ["tiny", "acme-support"]
    page.goto(console_server.url + "/console#/adapters")
    page.wait_for_selector("#adapters-table tbody tr[data-model='acme-support']")
    assert "beta-legal" not in page.inner_text("#adapters-table")
    # runs and reports are the operator's: not offered to a tenant, refused by the API
    assert not page.is_visible("#tabs a[data-view='runs']")
    page.goto(console_server.url + "/console#/runs")
    page.wait_for_selector("#notice:not([hidden])")
    assert "admin key only" in page.inner_text("#notice")
    assert api(console_server, "/console/api/runs", ACME_KEY).status_code == 403
    assert api(console_server, "/console/api/reports", ACME_KEY).status_code == 403
    assert [a["id"] for a in api(console_server, "/console/api/adapters", ACME_KEY).json()] == ["tiny", "acme-support"]
    assert api(console_server, "/console/api/adapters", "sk-wrong-000000").status_code == 401
    assert api(console_server, "/console/api/prompts", ACME_KEY).json() == []


def test_runs_view_shows_live_log_half_written_line_and_missing_checkpoints(watched, console_server):
    page = watched.open(ADMIN_KEY, "runs/support-sft")
    page.wait_for_selector("#run-detail h2")
    rows = {r.get_attribute("data-run"): r.inner_text() for r in page.query_selector_all("#runs-table tbody tr")}
    assert set(rows) == {"support-sft", "legal-dpo", "consortium"}
    assert "in progress" in rows["support-sft"] and "done" in rows["legal-dpo"]
    detail = page.inner_text("#run-detail")
    assert "log.jsonl:7: half-written last line" in detail
    assert "No checkpoints in this run." in detail
    assert "method: sft" in page.inner_text("#run-detail pre.config")
    # the curve: six complete steps of train loss, three held-out points
    train = page.get_attribute("polyline[data-series='train loss']", "points").split()
    held = page.get_attribute("polyline[data-series='held-out loss']", "points").split()
    assert (len(train), len(held)) == (6, 3)
    watched.shot("runs")
    # a step more is written while the page is open: the curve grows without a reload
    log = console_server.runs / "support-sft" / "log.jsonl"
    text = log.read_text()
    log.write_text(text[: text.rindex("\n") + 1] + '{"step": 7, "loss": 1.05}\n')
    # (polled from here: the page's CSP forbids the eval that wait_for_function would need)
    for _ in range(100):
        if len(page.get_attribute("polyline[data-series='train loss']", "points").split()) == 7:
            break
        page.wait_for_timeout(100)
    assert len(page.get_attribute("polyline[data-series='train loss']", "points").split()) == 7
    assert "half-written" not in page.inner_text("#run-detail")


def test_federated_run_rounds(watched):
    page = watched.open(ADMIN_KEY, "runs/consortium")
    page.wait_for_selector("table.rounds")
    rows = [r.inner_text() for r in page.query_selector_all("table.rounds tr")[1:]]
    assert len(rows) == 2
    assert "clinic-a, clinic-b" in rows[0] and "1.250" in rows[0] and "1.900" in rows[1]
    assert "80.1 KiB" in rows[0]  # 2 × 41000 bytes sent
    assert "round-0002" in page.inner_text("#run-detail ul.checkpoints")
    watched.shot("federated")


def test_reports_summary_and_older_format(watched, console_server):
    page = watched.open(ADMIN_KEY, "reports/support-sft/eval")
    page.wait_for_selector(".report-frame")
    current = page.inner_text(".report[data-report='support-sft/eval']")
    assert "acme-support is significantly better than base on support-qa (accuracy +0.3000)" in current
    assert "acme-support is significantly worse than base on multilingual" in current
    old = page.inner_text(".report[data-report='old-eval']")
    assert "older format" in old and "no differences against the reference" in old
    # the self-contained report.html, in a sandboxed frame
    frame = page.frame_locator(".report-frame")
    assert "plural eval" in frame.locator("h1").inner_text()
    assert page.get_attribute(".report-frame", "sandbox") == ""
    watched.shot("reports")


def test_page_asks_only_its_own_origin(watched, console_server):
    page = watched.open(ADMIN_KEY, "compare")
    for view in ("adapters", "runs/support-sft", "runs/consortium", "reports/support-sft/eval"):
        page.goto(f"{console_server.url}/console#/{view}")
        page.wait_for_load_state("networkidle")
    assert len(watched.requests) >= 8
    assert watched.outside == []  # the fixture asserts this again, for every test
    # the static files need no key, the script is small, and nothing in them points elsewhere
    for name in ("console.js", "console.css"):
        r = httpx.get(f"{console_server.url}/console/static/{name}")
        assert r.status_code == 200 and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
    assert len(httpx.get(console_server.url + "/console/static/console.js").content) < 100_000
    assert httpx.get(console_server.url + "/console/static/../app.py").status_code == 404
    assert api(console_server, "/console/api/runs/../../etc", ADMIN_KEY).status_code == 404


def test_prompt_from_a_suite(watched):
    page = watched.open(ADMIN_KEY, "compare")
    page.wait_for_selector("#suite-prompt option[value='When does the shop open on Saturday?']", state="attached")
    page.select_option("#suite-prompt", "When does the shop open on Saturday?")
    assert page.input_value("#prompt") == "When does the shop open on Saturday?"


def test_reload_keeps_view_and_settings(watched, console_server):
    page = watched.open(ADMIN_KEY, "compare")
    page.fill("#prompt", "Kept across a reload?")
    for box in page.query_selector_all("#variants input"):
        box.set_checked(box.get_attribute("value") in ("acme-support", "beta-legal"))
    page.fill("#max-tokens", "3")
    page.click("#run")
    page.wait_for_selector("#compare-status:text('done')", timeout=30_000)
    answers = [c.inner_text() for c in page.query_selector_all(".answer")]
    page.reload()  # the key, the compare settings and the last answers live in this tab's sessionStorage
    page.wait_for_selector("#who-text:not(:empty)")
    assert page.input_value("#prompt") == "Kept across a reload?"
    page.wait_for_selector(".answer")
    assert [c.inner_text() for c in page.query_selector_all(".answer")] == answers
    assert "last comparison" in page.inner_text("#compare-status")
    assert [b.get_attribute("value") for b in page.query_selector_all("#variants input:checked")] == ["acme-support", "beta-legal"]
    page.goto(console_server.url + "/console#/runs/legal-dpo")
    page.reload()
    page.wait_for_selector("#run-detail h2")
    assert "legal-dpo" in page.inner_text("#run-detail h2") and "step-0000002" in page.inner_text("#run-detail")


def test_admin_loads_and_unloads_an_adapter_from_the_page(watched, console_server):
    page = watched.open(ADMIN_KEY, "adapters")
    page.wait_for_selector("#adapters-table tbody tr[data-model='acme-support']")
    path = api(console_server, "/admin/adapters", ADMIN_KEY).json()[0]["path"]
    page.fill("#load-name", "acme-copy")
    page.fill("#load-path", path)
    page.click("#load-form button")
    page.wait_for_selector("#adapters-table tbody tr[data-model='acme-copy']")
    assert "acme-copy" in [m["id"] for m in api(console_server, "/v1/models", ADMIN_KEY).json()["data"]]
    assert page.query_selector("#variants input[value='acme-copy']") is not None
    # a path outside the store and adapter_dirs is refused, and the page says why
    watched.expected.append("status of 400 (Bad Request)")
    page.fill("#load-name", "elsewhere")
    page.fill("#load-path", "/etc")
    page.click("#load-form button")
    page.wait_for_selector("#load-status:text('refused')")
    assert "path:" in page.inner_text("#load-status")
    assert len(watched.errors) == 1  # that one 400, nothing else
    page.once("dialog", lambda d: d.accept())
    page.click("#adapters-table tbody tr[data-model='acme-copy'] button")
    page.wait_for_selector("#adapters-table tbody tr[data-model='acme-copy']", state="detached")
    assert "acme-copy" not in [m["id"] for m in api(console_server, "/v1/models", ADMIN_KEY).json()["data"]]

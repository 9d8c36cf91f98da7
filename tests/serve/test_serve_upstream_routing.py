"""The front's routing, error mapping and vLLM's rank rule, without processes (serve/upstream.py, serve/vllm.py)."""

from __future__ import annotations

import json

import pytest

from plural.errors import PluralError
from plural.serve.metrics import Metrics
from plural.serve.serving import APIError
from plural.serve.settings import ServeSettings
from plural.serve.upstream import Replica, Upstreams, parse_upstream
from plural.serve.vllm import adapter_rank, lora_rank_flag

CARDS = {"base": {"id": "base", "parent": None}, "legal": {"id": "legal", "parent": "base"},
         "hr": {"id": "hr", "parent": "base"}}


def front(n: int = 2, **kw) -> Upstreams:
    s = ServeSettings(upstream=[f"http://10.0.0.{i}:8000" for i in range(n)], **kw)
    ups = Upstreams(s, Metrics())
    for r in ups.replicas:
        r.healthy, r.error, r.models = True, None, dict(CARDS)
    return ups


def test_parse_upstream_names_and_strips_v1():
    assert parse_upstream("http://h:1/v1/", 0) == ("upstream-1", "http://h:1")
    assert parse_upstream("gpu-a=https://h:2", 3) == ("gpu-a", "https://h:2")
    with pytest.raises(ValueError):
        ServeSettings(upstream=["h:8000"])
    with pytest.raises(ValueError, match="used twice"):
        ServeSettings(upstream=["a=http://h:1", "a=http://h:2"])


def test_least_loaded_then_least_recently_picked():
    ups = front(3)
    a, b, c = ups.replicas
    b.in_flight = 1
    assert ups.pick("base") is a
    assert ups.pick("base") is c  # a and c idle: the one picked least recently
    assert ups.pick("base") is a


def test_adapter_affinity_prefers_a_replica_that_served_it():
    ups = front(2)
    a, b = ups.replicas
    first = ups.pick("legal")
    ups._served(first, "legal")
    assert ups.pick("legal") is first  # without affinity the other idle replica would be next
    first.in_flight = 3
    assert ups.pick("legal") is first  # still preferred while it has room (it holds the adapter)
    first.in_flight = ups.settings.upstream_max_in_flight
    assert ups.pick("legal") is not first  # full: the least loaded other one
    ups._served(a, "base")
    assert "base" not in a.recent  # every replica has the base: no affinity kept for it


def test_affinity_set_is_bounded_like_lora_slots():
    ups = front(1, max_loras=2)
    r = ups.replicas[0]
    r.models.update({f"x{i}": {"id": f"x{i}", "parent": "base"} for i in range(3)})
    for m in ("x0", "x1", "x2"):
        ups._served(r, m)
    assert list(r.recent) == ["x1", "x2"]


def test_full_replicas_429_down_replicas_503():
    ups = front(2, upstream_max_in_flight=1)
    for r in ups.replicas:
        r.in_flight = 1
    with pytest.raises(APIError) as e:
        ups.pick("base")
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    for r in ups.replicas:
        ups._mark_down(r, "connection refused")
    with pytest.raises(APIError) as e:
        ups.pick("base")
    assert e.value.status == 503 and e.value.code == "upstream_unavailable" and "Retry-After" in e.value.headers
    assert "10.0.0" not in e.value.message
    body, code = ups.health()
    assert code == 503 and body["status"] == "unavailable"
    assert [u["error"] for u in body["upstreams"]] == ["connection refused"] * 2


def test_model_map_renames_both_ways():
    ups = front(1, model_map={"support": "legal"})
    assert ups.knows("support") and not ups.knows("legal") and ups.knows("hr")
    ids = {c.id: c.parent for c in ups.cards(0)}
    assert ids == {"base": None, "support": "base", "hr": "base"}


@pytest.mark.parametrize("status,body,want_status,want_code", [
    (400, {"error": {"message": "bad at http://10.0.0.0:8000/v1", "type": "BadRequestError", "code": 400}}, 400, None),
    (422, {"detail": [{"msg": "field required"}]}, 400, None),
    (404, {"object": "error", "message": "The model `legal` does not exist.", "code": 404}, 404, "model_not_found"),
    (429, {"error": {"message": "busy", "code": "queue_full"}}, 429, "queue_full"),
    (401, {"error": "Unauthorized"}, 502, "upstream_auth"),
    (500, {"object": "error", "message": "crash at 10.0.0.0:8000", "type": "InternalServerError"}, 502, "upstream_error"),
    (503, {"error": {"message": "shutting down", "code": "shutting_down"}}, 503, "shutting_down"),
])
def test_upstream_errors_map_to_openai_errors_without_the_address(status, body, want_status, want_code):
    ups = front(1)
    r = ups.replicas[0]
    e = ups._upstream_error(r, status, json.dumps(body).encode(), {}, "legal")
    assert e.status == want_status and e.code == want_code
    assert "10.0.0.0" not in json.dumps(e.body())
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_scrub_replaces_every_spelling_of_the_address():
    r = Replica("gpu-a", "http://10.1.2.3:8000")
    assert r.scrub("x http://10.1.2.3:8000/v1 y 10.1.2.3:8000 z 10.1.2.3") == "x <gpu-a>/v1 y <gpu-a> z <gpu-a>"


def test_vllm_rank_flag_is_the_smallest_allowed_that_fits():
    assert lora_rank_flag([4]) == 8
    assert lora_rank_flag([8, 2]) == 8
    assert lora_rank_flag([9]) == 16
    assert lora_rank_flag([1]) == 1
    assert lora_rank_flag([300]) == 320
    with pytest.raises(PluralError, match="up to 512"):
        lora_rank_flag([513])
    assert adapter_rank({"r": 8, "rank_pattern": {"q_proj": 24}}) == 24

"""The console: a static page at /console (HTML, CSS and plain JavaScript shipped in the package,
no build step, nothing fetched from anywhere but this server) and the JSON it reads that the
OpenAI API does not serve.

Keys: the static files need none (they hold no data); every /console/api call takes the same
`Authorization: Bearer KEY` as the API. A tenant's key sees only its models' adapters. Runs and
eval reports (runs_dir) belong to the operator: on a server with API keys only the admin key
sees them; on a keyless server (loopback only) every caller does, as with /metrics.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from plural.errors import PluralError
from plural.serve import console_runs as R
from plural.serve.routes import admin, list_models, tenant
from plural.serve.serving import APIError
from plural.serve.tenants import Tenant, bearer

console_router = APIRouter()
# name -> media type; the only files /console/static serves
STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
# The page may talk to its own origin only, and a report's HTML (shown in a sandboxed srcdoc
# iframe) may load nothing but its inline data: images.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'")


def _asset(name: str) -> bytes:
    return resources.files("plural.serve").joinpath("console", name).read_bytes()


@console_router.get("/console", include_in_schema=False)
@console_router.get("/console/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_asset("index.html"), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@console_router.get("/console/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in STATIC:
        raise APIError(404, f"no console file {name!r}", type="not_found_error")
    return Response(_asset(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- who and what


class Whoami(BaseModel):
    tenant: str
    admin: bool  # may load/unload adapters
    runs: bool  # may see runs and reports
    runs_dir: str | None  # shown to those who may see runs
    base: str


class AdapterRow(BaseModel):
    id: str
    base: str | None = None  # the base model the manifest names
    method: str | None = None
    data: list[dict[str, Any]] = []  # [{path, sha256}] of the training data
    created: str | None = None
    metrics: dict[str, Any] = {}
    size: int | None = None  # bytes on disk of the adapter folder
    rank: int | None = None
    resident: bool | None = None  # in the engine's LRU of loaded LoRA slots now (None: not known here)
    running: int = 0  # sequences using it now
    digest: str | None = None
    signer: str | None = None
    trust: str  # "trusted" (verified at registration), "signed, not verified", "unsigned", "base model", "unknown (upstream)"
    system_prompt: str | None = None  # used when a request has no system message (value profile)
    path: str | None = None  # admin only
    problems: list[str] = []


def _is_admin(request: Request) -> bool:
    return request.app.state.server.keys.is_admin(bearer(request.headers.get("authorization")))


def _may_see_runs(request: Request) -> bool:
    return not request.app.state.server.keys.required or _is_admin(request)


def runs_access(request: Request, t: Tenant = Depends(tenant)) -> None:
    if request.app.state.server.keys.required:
        admin(request)


@console_router.get("/console/api/auth")
async def auth(request: Request) -> dict[str, bool]:
    """Whether a key is needed (no key needed to ask; /v1/models' 401 tells as much), so the page
    asks for one before its first data call instead of provoking a 401."""
    return {"keys_required": request.app.state.server.keys.required}


@console_router.get("/console/api/whoami", response_model=Whoami)
async def whoami(request: Request, t: Tenant = Depends(tenant)):
    state = request.app.state.server
    see = _may_see_runs(request)
    return Whoami(tenant=t.name, admin=_is_admin(request), runs=see,
                  runs_dir=state.settings.runs_dir if see else None, base=state.base_id)


@console_router.get("/console/api/adapters", response_model=list[AdapterRow])
async def adapters(request: Request, t: Tenant = Depends(tenant)):
    """One row per model id of the key's /v1/models listing (so the two always agree), with what
    the engine and the adapter's folder add. In front mode (no engine here) a row holds what the
    listing says."""
    state = request.app.state.server
    paths = _is_admin(request)
    engine = getattr(state, "engine", None)
    rows = []
    for card in (await list_models(request, t)).data:
        a = engine.adapters.get(card.id) if engine is not None else None
        if card.parent is None:
            rows.append(AdapterRow(id=card.id, base=card.id, trust="base model", resident=True,
                                   system_prompt=state.system_prompts.get(card.id), path=card.root))
        elif a is None:
            about = card.plural or {}
            rows.append(AdapterRow(id=card.id, base=card.parent, digest=about.get("digest"), signer=about.get("signer"),
                                   trust="trusted" if about.get("signer") else "unknown (upstream)", resident=None,
                                   system_prompt=state.system_prompts.get(card.id), path=card.root))
        else:
            rows.append(adapter_row(state, card.id, a, paths))
    return rows


def adapter_row(state, name: str, a, paths: bool) -> AdapterRow:
    from plural.share.signing import SIGNATURE
    from plural.store.adapters import read_manifest

    about = state.adapter_info.get(name) or {}
    problems = []
    try:
        man = read_manifest(a.path)
    except PluralError as e:
        man, problems = {}, [str(e)]
    if not man and not problems:
        problems.append("no plural.json manifest (an adapter made outside plural)")
    base = man.get("base") if isinstance(man.get("base"), dict) else {}
    signer = about.get("signer")
    trust = "trusted" if signer else ("signed, not verified" if (Path(a.path) / SIGNATURE).is_file() else "unsigned")
    return AdapterRow(
        id=name, base=base.get("name"), method=man.get("method"),
        data=[d for d in man.get("data") or [] if isinstance(d, dict)],
        created=man.get("created"), metrics=man.get("metrics") if isinstance(man.get("metrics"), dict) else {},
        size=R.folder_bytes(Path(a.path)), rank=a.rank, resident=a.resident, running=a.users,
        digest=about.get("digest"), signer=signer, trust=trust, system_prompt=state.system_prompts.get(name),
        path=str(a.path) if paths else None, problems=problems)


# ----------------------------------------------------------------------------- runs and reports
# Plain `def` handlers: FastAPI runs them on its thread pool, so reading a long log or walking the
# runs folder never holds up the event loop that streams tokens.


def _root(request: Request) -> Path | None:
    d = request.app.state.server.settings.runs_dir
    return Path(d) if d and Path(d).is_dir() else None


class RunList(BaseModel):
    runs_dir: str | None
    exists: bool
    runs: list[R.RunSummary]


class ReportList(BaseModel):
    runs_dir: str | None
    exists: bool
    reports: list[R.ReportSummary]


@console_router.get("/console/api/runs", response_model=RunList, dependencies=[Depends(runs_access)])
def runs(request: Request):
    root = _root(request)
    found = R.find_runs(root) if root else []
    return RunList(runs_dir=request.app.state.server.settings.runs_dir, exists=root is not None,
                   runs=sorted((R.read_run(root, d) for d in found), key=lambda r: -r.modified))


@console_router.get("/console/api/runs/{run_id:path}", response_model=R.RunDetail, dependencies=[Depends(runs_access)])
def run(run_id: str, request: Request):
    root = _root(request)
    d = R.lookup(root, run_id, R.find_runs(root)) if root else None
    if d is None:
        raise APIError(404, f"no run {run_id!r} under runs_dir", type="not_found_error")
    return R.read_run(root, d, detail=True)


@console_router.get("/console/api/reports", response_model=ReportList, dependencies=[Depends(runs_access)])
def reports(request: Request):
    root = _root(request)
    found = R.find_reports(root) if root else []
    return ReportList(runs_dir=request.app.state.server.settings.runs_dir, exists=root is not None,
                      reports=[R.read_report(root, d)[0] for d in found])


def _report_dir(request: Request, report_id: str) -> Path:
    root = _root(request)
    d = R.lookup(root, report_id, R.find_reports(root)) if root else None
    if d is None:
        raise APIError(404, f"no report {report_id!r} under runs_dir", type="not_found_error")
    return d


@console_router.get("/console/api/report-html/{report_id:path}", dependencies=[Depends(runs_access)])
def report_html(report_id: str, request: Request):
    p = _report_dir(request, report_id) / R.REPORT_HTML
    if not p.is_file():
        raise APIError(404, f"report {report_id!r} has no {R.REPORT_HTML}", type="not_found_error")
    # The page shows it in a sandboxed iframe (srcdoc): no scripts, no requests but data: images.
    return HTMLResponse(p.read_bytes(), headers={"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"})


@console_router.get("/console/api/prompts", response_model=list[R.Prompt])
def prompts(request: Request, t: Tenant = Depends(tenant)):
    """Prompts from the eval reports' suites (for those who may see reports; else none)."""
    root = _root(request)
    if root is None or not _may_see_runs(request):
        return []
    out, seen = [], set()
    for d in R.find_reports(root):
        for p in R.report_prompts(R.read_report(root, d)[1]):
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
    return out[:200]

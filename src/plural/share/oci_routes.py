"""The read side of the OCI distribution API, so that a plural server is a peer to pull from.

    GET /v2/                                  API version check (200 once authorised)
    GET /v2/<repository>/tags/list            the tags shared under a repository
    GET|HEAD /v2/<repository>/manifests/<tag|digest>
    GET|HEAD /v2/<repository>/blobs/<digest>  only blobs of the adapters shared under <repository>

`plural adapters pull http://peer:8000/acme/support:v1 --token KEY` (or any OCI client with
the key as password in docker's config.json) reads it. The manifest is the one `plural
adapters push` would send (same bytes, same digest), built from the adapter folder.

The router holds no state of its own: what may be shared and how keys are checked come in a
`PeerShare` built by the server. Mount it with `app.include_router(oci_router(share))`.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from plural.errors import PluralError
from plural.share.oci import OCI_MANIFEST, Artifact, build_artifact

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class SharedAdapter:
    repository: str  # e.g. "acme/support"
    tag: str  # e.g. "v1"
    path: Path  # the adapter folder


@dataclass
class PeerShare:
    adapters: list[SharedAdapter]
    # The key the client presented (a bearer token, or the password of Basic auth; None when
    # none) -> may it read? The server decides: its admin keys, its `share` keys.
    authorize: Callable[[Optional[str]], bool]
    _cache: dict = field(default_factory=dict, repr=False)

    def artifact(self, shared: SharedAdapter) -> Artifact:
        """The artifact of one folder, rebuilt only when a file in it changed (hashing is not free)."""
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(shared.path.iterdir()))
        hit = self._cache.get(shared.path)
        if hit is None or hit[0] != stamp:
            hit = (stamp, build_artifact(shared.path))
            self._cache[shared.path] = hit
        return hit[1]


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"errors": [{"code": code, "message": message}]}, status_code=status, headers=headers)


def _presented_key(request: Request) -> Optional[str]:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    if scheme.lower() == "basic" and value:
        try:
            return base64.b64decode(value).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def oci_router(share: PeerShare) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["oci"])

    def denied(request: Request) -> Optional[JSONResponse]:
        if share.authorize(_presented_key(request)):
            return None
        # Basic, so that docker-style clients answer with the config.json credentials.
        return _error(401, "UNAUTHORIZED", "an admin or share key is required", {"WWW-Authenticate": 'Basic realm="plural"'})

    def in_repo(name: str) -> list[SharedAdapter]:
        return [a for a in share.adapters if a.repository == name]

    def artifact(a: SharedAdapter) -> Artifact | JSONResponse:
        try:
            return share.artifact(a)
        except (PluralError, OSError) as e:
            return _error(500, "UNKNOWN", f"cannot share {a.repository}:{a.tag}: {e}")

    @router.get("/")
    def version_check(request: Request):
        return denied(request) or JSONResponse({})

    @router.get("/{name:path}/tags/list")
    def tags(name: str, request: Request):
        if (resp := denied(request)) is not None:
            return resp
        shared = in_repo(name)
        if not shared:
            return _error(404, "NAME_UNKNOWN", f"repository {name!r} is not shared here")
        return JSONResponse({"name": name, "tags": sorted(a.tag for a in shared)})

    @router.api_route("/{name:path}/manifests/{reference}", methods=["GET", "HEAD"])
    def manifest(name: str, reference: str, request: Request):
        if (resp := denied(request)) is not None:
            return resp
        for a in in_repo(name):
            art = artifact(a)
            if isinstance(art, JSONResponse):
                return art
            if reference in (a.tag, art.digest):
                return Response(art.manifest, media_type=OCI_MANIFEST, headers={"Docker-Content-Digest": art.digest})
        return _error(404, "MANIFEST_UNKNOWN", f"{name}:{reference} is not shared here")

    @router.api_route("/{name:path}/blobs/{digest}", methods=["GET", "HEAD"])
    def blob(name: str, digest: str, request: Request):
        if (resp := denied(request)) is not None:
            return resp
        if not _DIGEST_RE.match(digest):
            return _error(400, "DIGEST_INVALID", f"{digest!r} is not sha256:<64 hex digits>")
        # Only blobs of adapters shared under this very repository: a shared name is no door
        # to any other file of the server.
        for a in in_repo(name):
            art = artifact(a)
            if isinstance(art, JSONResponse):
                return art
            headers = {"Docker-Content-Digest": digest}
            if digest == art.config_digest:
                return Response(art.config, media_type="application/octet-stream", headers=headers)
            if (p := art.blob_path(digest)) is not None:
                return FileResponse(p, media_type="application/octet-stream", headers=headers)
        return _error(404, "BLOB_UNKNOWN", f"blob {digest} is not shared under {name!r}")

    return router

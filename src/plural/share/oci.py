"""The adapter as an OCI artifact (CNCF ModelPack media types), pushed to and pulled from a registry.

One adapter folder becomes one OCI image manifest::

    artifactType  application/vnd.cncf.model.manifest.v1+json
    config        application/vnd.cncf.model.config.v1+json   (ModelPack descriptor/config/modelfs)
    layers        one raw layer per file, named by the `org.cncf.model.filepath` annotation:
                    adapter_model.safetensors          …model.weight.v1.raw
                    adapter_config.json, plural.json   …model.weight.config.v1.raw
                    model.sig, provenance.sig          application/vnd.dev.sigstore.bundle.v0.3+json
    annotations   dev.plural.base.fingerprint (ModelPack has no notion of an adapter's base;
                  OCI 1.1 `subject` would need the base in the same registry), name, version, digest

Raw layers make each layer's digest the file's own sha256, so the registry, the OMS signature
and `plural adapters list` agree about every byte. The JSON is written with sorted keys and no
spaces so that the same folder always gives the same manifest digest (a peer and a registry
serve identical artifacts).

Pull trusts nothing it receives until checked: the manifest's size is capped, every file name
is a plain name (no `/`, no `..`), every blob is hashed while it streams and refused on a
digest or size mismatch, `--trust` verifies the signature and trust policy on the downloaded
folder, and only then is the folder renamed into the store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional
from urllib.parse import urljoin

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plural.config import format_validation_error
from plural.errors import PluralError
from plural.share.signing import PROVENANCE, SIGNATURE, adapter_digest
from plural.store.adapters import CONFIG, WEIGHTS, read_manifest, resolve_adapter
from plural.store.paths import adapters_dir, atomic_dir

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
A_BASE = "dev.plural.base.fingerprint"
A_BASE_NAME = "dev.plural.base.name"
A_NAME = "dev.plural.adapter.name"
A_VERSION = "dev.plural.adapter.version"
A_DIGEST = "dev.plural.adapter.digest"

# An adapter's manifest is a few KB; a registry (or peer) that sends more is refused before
# the rest is read, so a hostile one cannot exhaust memory.
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 64
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = r"^sha256:[0-9a-f]{64}$"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Descriptor(BaseModel):
    model_config = ConfigDict(extra="allow")
    mediaType: str
    digest: str = Field(pattern=_DIGEST_RE)
    size: int = Field(ge=0)
    annotations: dict[str, str] = {}


class ImageManifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    schemaVersion: Literal[2]
    mediaType: Optional[str] = None
    artifactType: Optional[str] = None
    config: Descriptor
    layers: list[Descriptor] = Field(max_length=MAX_LAYERS)
    annotations: dict[str, str] = {}


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _media_type(name: str) -> str:
    if name == WEIGHTS or name.endswith(".safetensors"):
        return WEIGHT_RAW
    if name in (SIGNATURE, PROVENANCE):
        return SIGSTORE_BUNDLE
    if name.endswith(".json"):
        return WEIGHT_CONFIG_RAW
    return DOC_RAW


def check_filename(name: str, where: str) -> str:
    """A file name from outside: one plain path component, nothing that could leave the folder."""
    if not _FILE_RE.match(name) or name in (".", ".."):
        raise PluralError(f"{where}: file name {name!r} is not allowed (one plain name: letters, digits, '.', '_', '-'; no '/' or '..')")
    return name


@dataclass
class Artifact:
    manifest: bytes
    digest: str
    config: bytes
    config_digest: str
    blobs: dict[str, Path]  # digest -> file (layers only)

    def blob_path(self, digest: str) -> Path | None:
        return self.blobs.get(digest)


def build_artifact(adapter: str | Path) -> Artifact:
    from plural.share.signing import file_digests

    path = resolve_adapter(adapter)
    for p in path.iterdir():
        if p.is_symlink() or not p.is_file():
            raise PluralError(f"{p}: an adapter folder to share holds plain files only (no folders or links)")
        check_filename(p.name, str(path))
    digests = file_digests(path)  # every file except model.sig
    if (path / SIGNATURE).is_file():
        digests[SIGNATURE] = hashlib.sha256((path / SIGNATURE).read_bytes()).hexdigest()
    man = read_manifest(path)
    base = man.get("base", {})
    layers, blobs = [], {}
    for name in sorted(digests):
        d = "sha256:" + digests[name]
        blobs[d] = path / name
        layers.append({"mediaType": _media_type(name), "digest": d, "size": (path / name).stat().st_size,
                       "annotations": {FILEPATH: name, TITLE: name}})
    prov = _signed_name_version(path)
    config = {
        "descriptor": {"name": prov[0] or path.name, "version": prov[1] or "", "createdAt": man.get("created") or None,
                       "family": base.get("architecture") or None},
        "config": {"format": "safetensors", "architecture": "lora"},
        "modelfs": {"type": "layers", "diffIds": [l["digest"] for l in layers]},
    }
    config["descriptor"] = {k: v for k, v in config["descriptor"].items() if v}
    config_bytes = _dumps(config)
    annotations = {A_NAME: prov[0] or path.name, A_DIGEST: adapter_digest(path)}
    if prov[1]:
        annotations[A_VERSION] = prov[1]
    if base.get("fingerprint"):
        annotations[A_BASE] = base["fingerprint"]
    if base.get("name"):
        annotations[A_BASE_NAME] = base["name"]
    if man.get("created"):
        annotations[CREATED] = man["created"]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODEL_ARTIFACT,
        "config": {"mediaType": MODEL_CONFIG, "digest": _sha256(config_bytes), "size": len(config_bytes)},
        "layers": layers,
        "annotations": annotations,
    }
    mb = _dumps(manifest)
    return Artifact(manifest=mb, digest=_sha256(mb), config=config_bytes, config_digest=_sha256(config_bytes), blobs=blobs)


def _signed_name_version(path: Path) -> tuple[str | None, str | None]:
    """Name and version as the provenance states them (unverified here; pull verifies)."""
    try:
        bundle = json.loads((path / PROVENANCE).read_text(encoding="utf-8"))
        pred = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))["predicate"]
        return str(pred["name"]), str(pred["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


# ---------------------------------------------------------------- references and credentials


class Reference(BaseModel):
    scheme: Optional[Literal["http", "https"]] = None
    host: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.host}/{self.repository}"
        return s + (f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}")


def parse_reference(ref: str) -> Reference:
    """`[http(s)://]HOST[:PORT]/REPO[/…][:TAG][@sha256:…]`."""
    scheme = None
    m = re.match(r"^(https?)://", ref)
    if m:
        scheme, ref = m.group(1), ref[m.end():]
    host, sep, rest = ref.partition("/")
    if not sep or not host or not rest:
        raise PluralError(f"reference {ref!r}: expected HOST[:PORT]/REPOSITORY[:TAG], e.g. 127.0.0.1:5000/acme/support:v1")
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not re.match(_DIGEST_RE, digest):
            raise PluralError(f"reference {ref!r}: digest {digest!r} is not sha256:<64 hex digits>")
    tag = None
    repo, colon, t = rest.rpartition(":")
    if colon and "/" not in t:
        rest, tag = repo, t
        if not _TAG_RE.match(tag):
            raise PluralError(f"reference {ref!r}: tag {tag!r} is not valid (letters, digits, '.', '_', '-'; at most 128)")
    if not _REPO_RE.match(rest):
        raise PluralError(f"reference {ref!r}: repository {rest!r} is not valid (lower-case letters, digits, separators '.', '_', '-', '/')")
    return Reference(scheme=scheme, host=host, repository=rest, tag=tag, digest=digest)


def docker_credentials(host: str) -> tuple[str, str] | None:
    """(user, password) for `host` from docker's config.json ($DOCKER_CONFIG or ~/.docker)."""
    cfg_dir = os.environ.get("DOCKER_CONFIG")
    p = Path(cfg_dir) / "config.json" if cfg_dir else Path.home() / ".docker" / "config.json"
    if not p.is_file():
        return None
    try:
        auths = json.loads(p.read_text(encoding="utf-8")).get("auths", {})
    except ValueError as e:
        raise PluralError(f"{p}: not valid JSON ({e})") from e
    for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/"):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as e:
                raise PluralError(f"{p}: auths.{key}.auth is not base64 of USER:PASSWORD") from e
            return user, pw
        if entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class RegistryAuth(httpx.Auth):
    """Docker registry auth: a static bearer token (a peer's key), else answer the registry's
    challenge (Basic, or the Bearer token flow) with the credentials from config.json."""

    def __init__(self, credentials: tuple[str, str] | None, token: str | None) -> None:
        self.credentials = credentials
        # The last header that was accepted is sent up front on every later request: a blob
        # upload streams its body, which cannot be sent a second time after a 401.
        self.header = f"Bearer {token}" if token else None

    def auth_flow(self, request: httpx.Request):
        if self.header:
            request.headers["Authorization"] = self.header
        response = yield request
        if response.status_code != 401 or self.credentials is None:
            return
        scheme, params = _parse_challenge(response.headers.get("www-authenticate", ""))
        user, pw = self.credentials
        basic = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        if scheme == "basic":
            self.header = basic
        elif scheme == "bearer" and "realm" in params:
            # The registry token flow: ask the realm for a token for this scope with the credentials.
            q = {k: v for k, v in params.items() if k in ("service", "scope")}
            r = httpx.get(params["realm"], params=q, headers={"Authorization": basic}, timeout=30)
            if r.status_code != 200:
                return
            body = r.json()
            self.header = f"Bearer {body.get('token') or body.get('access_token')}"
        else:
            return
        request.headers["Authorization"] = self.header
        yield request


# ---------------------------------------------------------------- the client


@dataclass
class Registry:
    ref: Reference
    insecure: bool = False
    token: str | None = None
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        scheme = self.ref.scheme or ("http" if self.insecure else "https")
        self.base = f"{scheme}://{self.ref.host}"
        self.client = httpx.Client(base_url=self.base, auth=RegistryAuth(docker_credentials(self.ref.host), self.token),
                                   timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def _url(self, kind: str, what: str) -> str:
        return f"/v2/{self.ref.repository}/{kind}/{what}"

    def _fail(self, r: httpx.Response, what: str) -> PluralError:
        detail = ""
        try:
            errs = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs)
        except ValueError:
            pass
        hint = " Fix: credentials in docker's config.json, or --token for a peer" if r.status_code in (401, 403) else ""
        return PluralError(f"{self.base}{r.request.url.path}: {what}: HTTP {r.status_code}{' (' + detail + ')' if detail else ''}.{hint}")

    # push

    def push(self, art: Artifact, tag: str, on_blob=None) -> str:
        uploads = [(d, p.stat().st_size, p) for d, p in art.blobs.items()] + [(art.config_digest, len(art.config), art.config)]
        for digest, size, src in uploads:
            if self.client.head(self._url("blobs", digest)).status_code == 200:
                continue  # content addressing: a blob the registry holds need not travel again
            r = self.client.post(f"/v2/{self.ref.repository}/blobs/uploads/")
            if r.status_code != 202 or "location" not in r.headers:
                raise self._fail(r, "cannot start a blob upload")
            # The upload URL carries the registry's own state in its query; add to it, never replace it.
            loc = httpx.URL(urljoin(self.base + "/", r.headers["location"])).copy_add_param("digest", digest)
            body = src if isinstance(src, bytes) else _file_chunks(src)
            r = self.client.put(loc, content=body,
                                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
            if r.status_code != 201:
                raise self._fail(r, f"blob {digest[:19]}… was not accepted")
            if on_blob:
                on_blob(digest, size)
        r = self.client.put(self._url("manifests", tag), content=art.manifest, headers={"Content-Type": OCI_MANIFEST})
        if r.status_code != 201:
            raise self._fail(r, "the manifest was not accepted")
        return art.digest

    # pull

    def manifest(self) -> tuple[ImageManifest, str]:
        url = self._url("manifests", self.ref.reference)
        with self.client.stream("GET", url, headers={"Accept": OCI_MANIFEST}) as r:
            if r.status_code != 200:
                r.read()
                raise self._fail(r, "no such manifest" if r.status_code == 404 else "cannot read the manifest")
            if int(r.headers.get("content-length") or 0) > MAX_MANIFEST_BYTES:
                raise PluralError(f"{self.base}{url}: manifest of {r.headers['content-length']} bytes refused (at most {MAX_MANIFEST_BYTES})")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise PluralError(f"{self.base}{url}: manifest larger than {MAX_MANIFEST_BYTES} bytes refused")
        digest = _sha256(bytes(data))
        if self.ref.digest and digest != self.ref.digest:
            raise PluralError(f"{self.base}{url}: manifest digest is {digest}, not the {self.ref.digest} asked for")
        try:
            man = ImageManifest.model_validate_json(bytes(data))
        except ValidationError as e:
            raise PluralError(format_validation_error(e, f"{self.base}{url}")) from e
        if man.artifactType != MODEL_ARTIFACT and man.config.mediaType != MODEL_CONFIG:
            raise PluralError(f"{self.base}{url}: not a ModelPack model artifact (artifactType {man.artifactType!r})")
        return man, digest

    def fetch_blob(self, layer: Descriptor, dest: Path) -> None:
        """Stream one blob to `dest`, hashing as it comes; refuse any byte beyond its size."""
        name = dest.name
        h, n = hashlib.sha256(), 0
        url = self._url("blobs", layer.digest)
        with self.client.stream("GET", url) as r:
            if r.status_code != 200:
                r.read()
                raise self._fail(r, f"cannot fetch {name}")
            with open(dest, "xb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    n += len(chunk)
                    if n > layer.size:
                        raise PluralError(f"{name}: blob {layer.digest[:19]}… is larger than the {layer.size} bytes its manifest says; refused")
                    h.update(chunk)
                    f.write(chunk)
        got = "sha256:" + h.hexdigest()
        if got != layer.digest or n != layer.size:
            raise PluralError(f"{name}: blob digest mismatch: the manifest says {layer.digest}, the bytes received hash to {got} "
                              f"({n} of {layer.size} bytes); refused")


def _file_chunks(p: Path) -> Iterator[bytes]:
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


class PullResult(BaseModel):
    name: str
    path: Path
    manifest_digest: str
    digest: str
    signer: Optional[str] = None
    version: Optional[str] = None


def push(adapter: str | Path, ref: str, insecure: bool = False, token: str | None = None, on_blob=None) -> tuple[Reference, str]:
    r = parse_reference(ref)
    if r.digest:
        raise PluralError(f"{ref}: push to a tag (REPO:TAG), not to a digest")
    art = build_artifact(adapter)
    with Registry(r, insecure=insecure, token=token) as reg:
        return r, _wrap_http(lambda: reg.push(art, r.tag or "latest", on_blob), reg)


def pull(ref: str, trust=None, min_version: str | None = None, name: str | None = None, force: bool = False,
         insecure: bool = False, token: str | None = None, on_blob=None) -> PullResult:
    """Download an adapter artifact into the store; with `trust`, only if it verifies.

    The files land in a hidden temporary folder beside the destination and are renamed into
    place only after every check passed: an interrupted or refused pull installs nothing.
    """
    from plural.share.trust import verify_adapter

    r = parse_reference(ref)
    if min_version is not None and trust is None:
        raise PluralError("--min-version needs --trust: only a verified signature can state a version")
    name = name or r.repository.rsplit("/", 1)[-1]
    if not _NAME_RE.match(name):
        raise PluralError(f"adapter name {name!r} is not valid (letters, digits, '.', '_', '-'). Fix: --name NAME")
    dest = adapters_dir() / name
    if dest.exists() and not force:
        raise PluralError(f"adapter {name!r} already exists ({dest}). Fix: --name OTHER or --force to replace it")
    with Registry(r, insecure=insecure, token=token) as reg:
        man, mdigest = _wrap_http(reg.manifest, reg)
        names = []
        for i, layer in enumerate(man.layers):
            fp = layer.annotations.get(FILEPATH) or layer.annotations.get(TITLE)
            if not fp:
                raise PluralError(f"{r}: layers.{i}: no {FILEPATH} annotation; cannot tell which file it is")
            names.append(check_filename(fp, f"{r}: layers.{i}"))
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PluralError(f"{r}: the manifest lists {', '.join(sorted(dup))} more than once")
        missing = [f for f in (CONFIG, WEIGHTS) if f not in names]
        if missing:
            raise PluralError(f"{r}: not an adapter: the artifact has no {', '.join(missing)}")
        info = None
        with atomic_dir(dest, overwrite=force) as tmp:
            for layer, fname in zip(man.layers, names):
                _wrap_http(lambda: reg.fetch_blob(layer, tmp / fname), reg)
                if on_blob:
                    on_blob(fname, layer.size)
            if trust is not None:
                info = verify_adapter(tmp, trust, min_version=min_version)
            digest = adapter_digest(tmp)
    return PullResult(name=name, path=dest, manifest_digest=mdigest, digest=digest,
                      signer=info.signer if info else None, version=info.version if info else None)


def _wrap_http(fn, reg: Registry):
    try:
        return fn()
    except httpx.HTTPError as e:
        raise PluralError(f"{reg.base}: {type(e).__name__}: {e or 'connection failed'} (nothing was installed)") from e

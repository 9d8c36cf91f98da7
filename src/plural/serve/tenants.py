"""API keys and tenants: who may call, and which model ids each caller sees."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from plural.serve.settings import ApiKey


@dataclass(frozen=True)
class Tenant:
    name: str
    models: frozenset[str]  # "*" = every model id

    def allows(self, model_id: str) -> bool:
        return "*" in self.models or model_id in self.models


# With no keys configured (loopback-only server) every caller is this tenant.
OPEN = Tenant("local", frozenset({"*"}))
# The admin key: every model id (and, at /v1/models, where each one lives on disk).
ADMIN = Tenant("admin", frozenset({"*"}))


class Keys:
    def __init__(self, api_keys: list[ApiKey], admin_key: str | None):
        self._by_key = {k.key: Tenant(k.tenant, frozenset(k.models)) for k in api_keys}
        self.admin_key = admin_key

    @property
    def required(self) -> bool:
        return bool(self._by_key)

    def tenant(self, token: str | None) -> Tenant | None:
        """The key's tenant; None for a missing or unknown key. Constant-time compare per key."""
        if not self._by_key:
            return OPEN
        if not token:
            return None
        found = None
        for key, tenant in self._by_key.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        return found

    def is_admin(self, token: str | None) -> bool:
        return bool(self.admin_key and token and hmac.compare_digest(self.admin_key.encode(), token.encode()))


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None

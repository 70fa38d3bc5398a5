"""The verified identity an Outpost edge node asserts about a request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["EdgeIdentity"]


class ClaimError(ValueError):
    """A verified token whose claims do not follow the contract (wrong JSON types)."""


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ClaimError(f"{where}{key} must be a string, got {type(value).__name__}")


def _opt_number(obj: Mapping[str, Any], key: str, where: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ClaimError(f"{where}{key} must be a number, got {type(value).__name__}")


def _opt_object(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise ClaimError(f"{key} must be an object, got {type(value).__name__}")


def _words(value: Any) -> frozenset[str]:
    """A space-separated string or a list of strings, as a set (anything else: empty)."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, (list, tuple)):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def _timestamp(payload: Mapping[str, Any], key: str) -> datetime | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ClaimError(f"{key} must be a number (NumericDate), got {type(value).__name__}")
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, ValueError, OSError):
        raise ClaimError(f"{key} is out of range") from None


@dataclass(frozen=True)
class EdgeIdentity:
    """What the edge vouches for, after the token's signature and times were verified.

    ``raw`` is the whole claim set; the other fields are typed views of it.
    """

    #: The authenticated end user's subject; ``None`` for anonymous requests.
    sub: str | None
    #: End-user token claims the edge forwards (e.g. ``{"scope": "read write"}``).
    claims: dict[str, Any] = field(default_factory=dict)
    #: ISO 3166-1 alpha-2 country code, when the edge knows it.
    country: str | None = None
    lat: float | None = None
    lon: float | None = None
    #: Where the location came from: ``"header"``, ``"country"``, ``"network"`` or ``"node"``.
    geo_source: str | None = None
    #: Experiment name -> assigned variant name.
    variants: dict[str, str] = field(default_factory=dict)
    #: Id of the edge node that handled the request (e.g. ``"tokyo-1"``).
    node: str | None = None
    #: The edge's request id (32 hex digits), handy for correlating logs.
    request_id: str | None = None
    issued_at: datetime | None = None
    expires_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_claims(cls, payload: dict[str, Any]) -> EdgeIdentity:
        """Build from a verified claim set; raises :class:`ClaimError` on wrong JSON types."""
        issued_at = _timestamp(payload, "iat")
        expires_at = _timestamp(payload, "exp")
        _timestamp(payload, "nbf")
        geo = _opt_object(payload, "geo")
        variants = _opt_object(payload, "variant")
        for name, value in variants.items():
            if not isinstance(value, str):
                raise ClaimError(f"variant.{name} must be a string, got {type(value).__name__}")
        return cls(
            sub=_opt_str(payload, "sub", ""),
            claims=_opt_object(payload, "claims"),
            country=_opt_str(geo, "country", "geo."),
            lat=_opt_number(geo, "lat", "geo."),
            lon=_opt_number(geo, "lon", "geo."),
            geo_source=_opt_str(geo, "source", "geo."),
            variants=variants,
            node=_opt_str(payload, "node", ""),
            request_id=_opt_str(payload, "rid", ""),
            issued_at=issued_at,
            expires_at=expires_at,
            raw=payload,
        )

    @property
    def scopes(self) -> frozenset[str]:
        """OAuth scopes: ``claims.scope`` (space-separated string) and ``claims.scp`` (list or string)."""
        return _words(self.claims.get("scope")) | _words(self.claims.get("scp"))

    @property
    def roles(self) -> frozenset[str]:
        """Roles from ``claims.roles`` (list of strings, or a space-separated string)."""
        return _words(self.claims.get("roles"))

    def has_scope(self, *scopes: str) -> bool:
        """True when every one of ``scopes`` was granted."""
        return set(scopes) <= self.scopes

    def has_role(self, *roles: str) -> bool:
        """True when the user has every one of ``roles``."""
        return set(roles) <= self.roles

    def variant(self, experiment: str, default: str | None = None) -> str | None:
        """The variant assigned for ``experiment``, or ``default``."""
        return self.variants.get(experiment, default)

"""Feature flags: their wire definition and a pure, precompiled evaluator. No I/O.

Theory of operation
-------------------
A flag is a name, a default value (boolean, string, number or JSON) and an ordered
list of rules. A rule sets any of four conditions — the tenant is one of ``tenants``,
the targeting key is one of ``subjects``, the workflow name is one of ``workflows``, the
key's bucket is below ``percentage`` — and the value it gives. The first rule whose
every condition holds decides; if none does, the flag's default is the value.

Buckets: ``bucket(flag, key)`` takes the first 8 bytes of SHA-256 over
``flag NUL key`` as a number in ``[0, 2**64)`` and scales it to ``[0, 100)``. A key is
*in* a percentage ``p`` when its bucket is below ``p``, so a key that is in at 5 % is in
at every higher percentage (a user never flips back as a rollout grows), and because
the flag's name is hashed too, two flags roll out to independent slices of users.

Evaluation is the client's hot path (it runs in ``submit_workflow`` and wherever the
application asks ``client.flag``), so ``FlagBook`` compiles definitions once — frozen
sets for the membership tests, a plain dict by name — and keeps a bounded cache of
buckets; an evaluation is a dict lookup plus, for percentage rules, one cached hash.

Built-in flags per workflow name ``W`` (SPEC, Flags): ``tether.accept.W`` (default
true; false refuses new submits with reason ``disabled``) and ``tether.route.W``
(percentage of targeting keys whose submits go through Tether; default 100; a boolean
value means all or nobody).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec

__all__ = [
    "ACCEPT_PREFIX",
    "MAX_FLAGS",
    "MAX_FLAG_BYTES",
    "MAX_FLAG_NAME",
    "MAX_RULES",
    "ROUTE_PREFIX",
    "FlagBook",
    "FlagDef",
    "FlagRule",
    "accept_flag",
    "bucket",
    "check_flag",
    "route_flag",
]

ACCEPT_PREFIX = "tether.accept."
ROUTE_PREFIX = "tether.route."
MAX_FLAGS = 100
"""Most flags in one scope (one tenant, or the scope of every tenant)."""
MAX_FLAG_BYTES = 2048
"""Largest JSON encoding of one flag definition; with ``MAX_FLAGS`` per scope a
tenant's whole set (its own plus the global scope) fits in one frame."""
MAX_RULES = 32
"""Most rules of one flag."""
MAX_FLAG_NAME = 200
"""Longest flag name (``tether.route.`` plus a 128-character workflow name fits)."""
_BUCKET_CACHE = 4096

FlagName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FLAG_NAME, pattern=r"^\S+$")]
Percentage = Annotated[float, msgspec.Meta(ge=0, le=100)]


class FlagRule(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """One targeting rule: every condition set must hold; then ``value`` is the answer."""

    value: Any
    tenants: list[str] | None = None
    subjects: list[str] | None = None
    workflows: list[str] | None = None
    percentage: Percentage | None = None


class FlagDef(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A flag's definition as stored and as sent to clients."""

    name: FlagName
    default: Any
    rules: Annotated[list[FlagRule], msgspec.Meta(max_length=MAX_RULES)] = []
    version: int = 0
    """Bumped by every change of this flag (the audit trail numbers changes by it)."""


_encoder = msgspec.json.Encoder()


def check_flag(flag: FlagDef) -> FlagDef:
    """Refuse a definition that cannot be stored or evaluated safely.

    Args:
        flag: the definition (already of the right shape).

    Returns:
        The same definition.

    Raises:
        ValueError: a non-finite number, a NUL character, too deep a value, over
            ``MAX_FLAG_BYTES``, or a built-in flag with a value it cannot take.
    """
    _check_json(flag.default)
    for rule in flag.rules:
        _check_json(rule.value)
        for values in (rule.tenants, rule.subjects, rule.workflows):
            for text in values or ():
                if "\x00" in text:
                    raise ValueError("a rule condition contains a NUL character")
    values = [flag.default, *(rule.value for rule in flag.rules)]
    if flag.name.startswith(ACCEPT_PREFIX) and not all(isinstance(v, bool) for v in values):
        raise ValueError(f"{flag.name} takes true or false")
    if flag.name.startswith(ROUTE_PREFIX) and not all(_is_route(v) for v in values):
        raise ValueError(f"{flag.name} takes a percentage from 0 to 100, or true/false")
    size = len(_encoder.encode(flag))
    if size > MAX_FLAG_BYTES:
        raise ValueError(
            f"flag {flag.name!r} is {size} bytes encoded; the limit is {MAX_FLAG_BYTES}"
        )
    return flag


def _is_route(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, int | float) and 0 <= value <= 100


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise ValueError("flag value is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("flag values must be finite numbers (no NaN or infinity)")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("flag values must not contain a NUL character")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, depth + 1)
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


def bucket(flag: str, key: str) -> float:
    """The stable bucket of ``key`` for ``flag``, in ``[0, 100)``.

    Args:
        flag: the flag's name (hashed in, so flags slice users independently).
        key: the targeting key (by default the token's subject).

    Returns:
        ``int(sha256(flag NUL key)[:8]) / 2**64 * 100``.
    """
    digest = hashlib.sha256(f"{flag}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2.0**64


def accept_flag(workflow: str) -> str:
    """The kill switch flag of a workflow name: ``tether.accept.W``."""
    return ACCEPT_PREFIX + workflow


def route_flag(workflow: str) -> str:
    """The route (rollout) flag of a workflow name: ``tether.route.W``."""
    return ROUTE_PREFIX + workflow


class _Rule:
    __slots__ = ("percentage", "subjects", "tenants", "value", "workflows")

    def __init__(self, rule: FlagRule) -> None:
        self.value = rule.value
        self.tenants = frozenset(rule.tenants) if rule.tenants is not None else None
        self.subjects = frozenset(rule.subjects) if rule.subjects is not None else None
        self.workflows = frozenset(rule.workflows) if rule.workflows is not None else None
        self.percentage = rule.percentage


class FlagBook:
    """A compiled set of flags, evaluated locally in microseconds.

    Args:
        flags: the definitions (a later one of the same name replaces an earlier one).
        revision: the set's revision (rises with every change; see ``Flags``).
    """

    __slots__ = ("_buckets", "_compiled", "definitions", "revision")

    def __init__(self, flags: Iterable[FlagDef] = (), revision: int = 0) -> None:
        self.definitions = {flag.name: flag for flag in flags}
        self.revision = revision
        self._compiled: dict[str, tuple[Any, tuple[_Rule, ...]]] = {
            name: (flag.default, tuple(_Rule(rule) for rule in flag.rules))
            for name, flag in self.definitions.items()
        }
        self._buckets: dict[tuple[str, str], float] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def bucket(self, flag: str, key: str) -> float:
        """``bucket(flag, key)``, cached (the cache is bounded and simply restarts)."""
        found = self._buckets.get((flag, key))
        if found is None:
            if len(self._buckets) >= _BUCKET_CACHE:
                self._buckets.clear()
            found = self._buckets[(flag, key)] = bucket(flag, key)
        return found

    def evaluate(
        self,
        name: str,
        default: Any,
        *,
        tenant: str | None = None,
        key: str | None = None,
        workflow: str | None = None,
    ) -> Any:
        """The flag's value for this context, or ``default`` if the flag is unknown.

        Args:
            name: the flag.
            default: what an unknown flag evaluates to.
            tenant: the caller's tenant (for ``tenants`` conditions).
            key: the targeting key (``subjects`` and ``percentage`` conditions); a
                percentage condition never holds without one, except at 100.
            workflow: the workflow name (``workflows`` conditions).

        Returns:
            The first matching rule's value, else the flag's default.
        """
        compiled = self._compiled.get(name)
        if compiled is None:
            return default
        flag_default, rules = compiled
        for rule in rules:  # (``resolve`` without its bookkeeping: the hot path)
            if rule.tenants is not None and tenant not in rule.tenants:
                continue
            if rule.subjects is not None and key not in rule.subjects:
                continue
            if rule.workflows is not None and workflow not in rule.workflows:
                continue
            if rule.percentage is not None and not self._in(name, key, rule.percentage):
                continue
            return rule.value
        return flag_default

    def resolve(
        self,
        name: str,
        default: Any,
        *,
        tenant: str | None = None,
        key: str | None = None,
        workflow: str | None = None,
    ) -> tuple[Any, int]:
        """Like ``evaluate``, also telling what decided: the index of the matching rule,
        ``-1`` for the flag's default, ``-2`` for an unknown flag."""
        compiled = self._compiled.get(name)
        if compiled is None:
            return default, -2
        flag_default, rules = compiled
        for index, rule in enumerate(rules):
            if rule.tenants is not None and tenant not in rule.tenants:
                continue
            if rule.subjects is not None and key not in rule.subjects:
                continue
            if rule.workflows is not None and workflow not in rule.workflows:
                continue
            if rule.percentage is not None and not self._in(name, key, rule.percentage):
                continue
            return rule.value, index
        return flag_default, -1

    def _in(self, name: str, key: str | None, percentage: float) -> bool:
        if percentage >= 100:
            return True
        if key is None or percentage <= 0:
            return False
        return self.bucket(name, key) < percentage

    def accepts(self, workflow: str, *, tenant: str | None = None, key: str | None = None) -> bool:
        """Whether new submits of ``workflow`` are accepted (``tether.accept.W`` is not
        ``false``)."""
        value = self.evaluate(
            accept_flag(workflow), True, tenant=tenant, key=key, workflow=workflow
        )
        return value is not False

    def routes_through_tether(
        self, workflow: str, *, tenant: str | None = None, key: str | None = None
    ) -> bool:
        """Whether a submit of ``workflow`` by ``key`` goes through Tether
        (``tether.route.W``: a percentage of keys, or a boolean for all/none)."""
        name = route_flag(workflow)
        value = self.evaluate(name, 100, tenant=tenant, key=key, workflow=workflow)
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return self._in(name, key, float(value))
        return True

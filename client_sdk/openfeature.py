"""An OpenFeature provider over a ``SyncClient``'s flags (package ``openfeature-sdk``).

Application code keeps the standard API::

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from client_sdk.openfeature import TetherProvider

    api.set_provider(TetherProvider(client))
    flags = api.get_client()
    if flags.get_boolean_value("new-ui", False, EvaluationContext(targeting_key="u-42")):
        ...

It evaluates the same compiled set as ``client.flag`` — locally, offline with the last
known set — so both give the same value for the same key. The context's
``targeting_key`` is the key (default: the token's subject); an attribute ``workflow``
feeds workflow conditions; the tenant is always the token's. A set received from the
server emits ``PROVIDER_CONFIGURATION_CHANGED``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

if TYPE_CHECKING:
    from client_sdk.client import SyncClient

__all__ = ["TetherProvider"]


class TetherProvider(AbstractProvider):
    """OpenFeature provider backed by a ``SyncClient``'s synced flags.

    Args:
        client: a started (or at least constructed) ``SyncClient``.
    """

    def __init__(self, client: SyncClient) -> None:
        super().__init__()
        self.client = client
        client.flags.listeners.append(self._changed)

    def get_metadata(self) -> Metadata:
        """The provider's name: ``tether``."""
        return Metadata(name="tether")

    def shutdown(self) -> None:
        """Stop forwarding flag changes."""
        listeners = self.client.flags.listeners
        if self._changed in listeners:
            listeners.remove(self._changed)

    def _changed(self) -> None:
        if hasattr(self, "_on_emit"):
            self.emit_provider_configuration_changed(ProviderEventDetails())

    def _resolve(
        self, name: str, default: Any, context: EvaluationContext | None, kinds: tuple[type, ...]
    ) -> FlagResolutionDetails[Any]:
        flags = self.client.flags
        key = context.targeting_key if context is not None else None
        attributes = context.attributes if context is not None else {}
        workflow = attributes.get("workflow")
        value, index = flags.book.resolve(
            name,
            default,
            tenant=flags.tenant,
            key=key if key is not None else flags.subject,
            workflow=workflow if isinstance(workflow, str) else None,
        )
        if index == -2:
            return FlagResolutionDetails(
                value=default,
                reason=Reason.DEFAULT,
                error_code=ErrorCode.FLAG_NOT_FOUND,
                error_message=f"no flag {name!r}",
            )
        if not _is(value, kinds):
            return FlagResolutionDetails(
                value=default,
                reason=Reason.ERROR,
                error_code=ErrorCode.TYPE_MISMATCH,
                error_message=f"flag {name!r} is a {type(value).__name__}",
            )
        if index == -1:
            return FlagResolutionDetails(value=value, reason=Reason.STATIC, variant="default")
        rule = flags.book.definitions[name].rules[index]
        reason = Reason.SPLIT if rule.percentage is not None else Reason.TARGETING_MATCH
        return FlagResolutionDetails(value=value, reason=reason, variant=f"rule-{index}")

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        """A boolean flag."""
        return self._resolve(flag_key, default_value, evaluation_context, (bool,))

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        """A string flag."""
        return self._resolve(flag_key, default_value, evaluation_context, (str,))

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        """An integer flag."""
        return self._resolve(flag_key, default_value, evaluation_context, (int,))

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        """A number flag (an integer value is a float too)."""
        details = self._resolve(flag_key, default_value, evaluation_context, (float, int))
        if isinstance(details.value, int) and not isinstance(details.value, bool):
            details.value = float(details.value)
        return details

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        """A JSON object or list flag."""
        return self._resolve(flag_key, default_value, evaluation_context, (dict, list))


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)

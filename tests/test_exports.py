"""The public API of each package is its ``__all__``: the SPEC's names, all importable."""

from __future__ import annotations

import importlib

import pytest

SPEC_NAMES = {
    "client_sdk": {"SyncClient", "WorkflowHandle", "WorkflowView", "StepView"},
    "client_sdk.openfeature": {"TetherProvider"},
    "sync_server": {
        "Workflow",
        "Step",
        "Limit",
        "RetryPolicy",
        "StepContext",
        "PermanentError",
        "create_app",
    },
    "protocol": {
        "Hello",
        "Push",
        "Ack",
        "Welcome",
        "PushResult",
        "Events",
        "Error",
        "Mutation",
        "MutationResult",
        "Event",
        "PROTOCOL_VERSION",
        "TetherError",
        "ErrorCode",
        "WorkflowStatus",
        "StepStatus",
        "MutationStatus",
    },
}


@pytest.mark.parametrize("package", sorted(SPEC_NAMES))
def test_all_holds_the_spec_names_and_each_imports(package):
    module = importlib.import_module(package)
    exported = set(module.__all__)
    assert SPEC_NAMES[package] <= exported
    for name in exported:
        assert getattr(module, name) is not None


def test_sync_server_exports_exactly_the_spec():
    import sync_server

    assert set(sync_server.__all__) == SPEC_NAMES["sync_server"]


def test_client_sdk_extras_are_errors_only():
    import client_sdk
    from protocol import TetherError

    extras = set(client_sdk.__all__) - SPEC_NAMES["client_sdk"]
    for name in extras:
        value = getattr(client_sdk, name)
        assert isinstance(value, type) and issubclass(value, TetherError), name

"""The Tether sync server: event store, saga engine, sync endpoint, CLI."""

from sync_server.app import create_app

__all__ = ["create_app"]

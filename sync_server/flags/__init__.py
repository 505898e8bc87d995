"""Feature flags on the server: storage, cache and propagation, admin routes."""

"""Alembic migrations of the registry's schema; applied at start-up by `gateway.registry.migrate`."""

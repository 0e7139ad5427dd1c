"""Test support: redis_server (fixtures are added by the module's owner)."""

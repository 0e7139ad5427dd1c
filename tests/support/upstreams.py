"""Test support: upstreams (fixtures are added by the module's owner)."""

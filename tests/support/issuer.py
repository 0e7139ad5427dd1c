"""Test support: issuer (fixtures are added by the module's owner)."""

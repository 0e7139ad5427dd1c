"""Edge API gateway: verify the user's token once at the edge, forward identity to services."""

__version__ = "0.1.0"

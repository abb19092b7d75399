"""jwtlet: an OAuth 2.0 token exchange daemon on Twisted."""

__version__ = "0.1.0"

"""The two HTTP sites: what both ports share, the token exchange API, the management API and their JSON codecs."""

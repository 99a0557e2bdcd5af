"""HTTP handlers: thin adapters from requests to the session manager. Each module ends with its routes."""

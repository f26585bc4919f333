"""The HTTP API (FastAPI): endpoints, notifications, reconciliation."""

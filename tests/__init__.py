"""Tidings tests."""

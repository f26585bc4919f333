"""Integration tests: the whole service against real stores and real HTTP receivers."""

"""Bundled datasets (see SOURCE.md)."""

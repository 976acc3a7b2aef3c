"""Compatibility with the installed stack (see each module)."""

"""Validation of exported artifacts (generation smoke test for now)."""

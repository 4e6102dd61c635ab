"""Test support that ships with ring-train, for tests of its distributed code."""

"""Embedded hardware profiles (YAML)."""

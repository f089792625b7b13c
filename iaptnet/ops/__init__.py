"""Operators' tooling: keys and certificates, local networks in a box."""

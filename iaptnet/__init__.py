"""iaptnet: a federated analysis network for NHS Talking Therapies services."""

__version__ = "0.1.0"

"""iaptnet: a federated analysis network for NHS Talking Therapies services."""

__version__ = "0.3.0.dev0"

"""Study kind module (see protocol/kinds/__init__.py); not yet implemented."""

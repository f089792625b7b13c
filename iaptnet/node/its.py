"""Node half of a study kind (task handlers, see node/disclosure.py); not yet implemented."""

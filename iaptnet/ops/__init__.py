"""The operator's tooling: a network on one machine (launcher.py) and the commands for keys, the app hash and networks (cli.py)."""

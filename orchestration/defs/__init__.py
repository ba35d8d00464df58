"""The definitions, by kind: assets/, checks.py, automation.py, resources.py."""

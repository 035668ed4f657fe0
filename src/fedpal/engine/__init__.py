"""Engines run an algorithm over FederatedData; the in-process simulator is the default."""

"""Federated algorithms: one file per method, each a server/client protocol over Payloads and Replies."""

"""The contract every method implements, the registry, the one training loop and shared mechanics."""

"""Data: offline dataset loaders (``fedpal.data.sources``) and, alongside them, partitioning into clients."""

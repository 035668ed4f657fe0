"""Methods whose clients share class prototypes (per-class mean features), so architectures may differ."""

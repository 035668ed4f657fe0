"""The single evaluation protocol (DESIGN §5): personalized, generalization, global; selection by validation."""

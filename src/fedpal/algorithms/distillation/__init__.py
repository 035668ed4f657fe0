"""Methods whose clients share predictions or a small go-between model (knowledge distillation)."""

"""Methods whose clients share model weights, whole or in part."""

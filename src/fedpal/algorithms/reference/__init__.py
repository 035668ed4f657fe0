"""Reference points without collaboration (Local)."""

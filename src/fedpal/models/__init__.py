"""Model families: every model is a backbone producing a D-dimensional feature, then a linear head."""

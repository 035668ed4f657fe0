"""Neutral utilities every layer uses (seeding, tensor dicts); they import nothing else from fedpal."""

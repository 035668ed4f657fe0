"""Client-level differential privacy and simulated secure aggregation for the engine's reduction point.

Pure pieces the reduction pipeline composes (ROBUSTNESS.md §1, §5, §8): client transforms (``clipping``: joint L2
clipping of an update, adaptive clipping, per-class clipping of prototypes), Gaussian noise on the sum
(``gaussian_noise``), the privacy accountant over rounds (``accountant``, optional extra ``fedpal[dp]``), and a
simulation of secure aggregation with its byte cost (``secure_aggregation``).
"""

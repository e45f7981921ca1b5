"""Training: the positives and their sampler (pairs.py), the mixed-negative loss (losses.py), and the
loop (loop.py) with its config, optimiser, clock, DDP helpers, validation and checkpoints.
`itemsage train`."""

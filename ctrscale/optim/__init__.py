"""Optimizers: CowClip, LAMB/LARS, batch-size scaling rules, LR schedules, and the wiring of fused
embedding + dense optimizers."""

"""Distributed execution: process groups (gloo/nccl from config), sharding plans, the
DistributedModelParallel wrapper. The only package that reads torchrun's environment."""

"""Trainers, collators, callbacks, losses, metrics and optimizers."""

"""Evaluation: encoders from checkpoints, photo-z, morphology, label-fraction sweeps, similarity search."""

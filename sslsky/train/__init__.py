"""Training: pretraining and fine-tuning loops, the distributed environment, checkpoints."""

"""Training: the shared runtime (devices, precision, optimizer, schedules, checkpoints), the
pretraining and fine-tuning loops on top of it, the models and the batches they read."""

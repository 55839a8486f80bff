"""Training: the pretraining loop and its hooks, the shared supervised loop, schedules and optimizers."""

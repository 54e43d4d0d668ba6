"""Training iLoRA models: sample construction, the accelerate loop, checkpoints and run directories."""

"""The model and its training: architectures, the training loop, DDP, presets, devices, inference."""

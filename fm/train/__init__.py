"""Training: the loop, parallelism (DDP, FSDP2, tensor and pipeline parallel), checkpoints, optimizer, and the torchrun launch."""

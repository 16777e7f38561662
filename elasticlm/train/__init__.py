"""Training: the one loop (trainer), its objectives (pretrain, elastic), checkpoints, plans, sharding."""

"""The Ring-1T algorithms as pure, deterministic modules (see docs/algorithms.md).

- `ring.trajectory`: Trajectory, Prompt, FinishReason (plain data for the codec)
- `ring.scheduler`:  C3POScheduler (C3PO++), SyncScheduler, Batch
- `ring.advantages`: GRPO, Dr.GRPO, RLOO group advantages, uniform-group filtering
- `ring.icepop`:     icepop_loss, IcePopConfig (with GRPO and TIS baselines)

Nothing is imported here, so that `ring.scheduler` can be used without loading torch.
"""

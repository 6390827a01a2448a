"""torch.distributed for a group that loses members: failed collectives recognised, blocked ones interrupted, NCCL
error handling, deadlock-free peer-to-peer transfers, and agreement among ranks."""

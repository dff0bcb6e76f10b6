"""Everything that touches deepspeed or torch.distributed (model files never import them)."""

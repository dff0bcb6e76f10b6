"""Everything that touches deepspeed or torch.distributed (model files never import them)."""

# The engine's entry points (imported lazily by callers that need no DeepSpeed import here):
#   apex_dist.distributed.engine.TrainingEngine, .deepspeed_config.build_deepspeed_config,
#   .checkpoint.CheckpointManager, .shadow.ShadowWeights, .runtime.init_distributed

"""Engine integrations: thin adapters that turn an engine's own partitioning into `Segment`s for our optimizers.

- `mgup_dist.integrations.fsdp`: FSDP2 / DTensor parameters (``fully_shard``), adopted automatically.
- `mgup_dist.integrations.deepspeed`: ``initialize``, a drop-in for ``deepspeed.initialize`` (JSON selection,
  ZeRO stages 0-3, fp32/bf16); users normally import it as ``mgup_dist.deepspeed``.
  `mgup_dist.integrations.deepspeed_checkpoint` saves and loads a ZeRO-1/2 run in `mgup_dist.checkpoint`'s
  reshardable format.
- `mgup_dist.integrations.megatron`: ``get_optimizer``, ``get_megatron_optimizer`` with our optimizer inside
  Megatron-core's distributed optimizer (data parallelism so far); users import it as ``mgup_dist.megatron``.

No update math lives here. Submodules import their engine on first use only, so importing this package costs
nothing.
"""

"""GPT pretraining launcher for mgup_dist optimizers: `python -m launch.pretrain` / `torchrun -m launch.pretrain`."""

"""The training loop that runs inside every worker (under Ray, torchrun or accelerate)."""

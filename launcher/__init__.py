"""The driver side: CLI, run spec, Ray Train launch, progress."""

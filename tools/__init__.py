"""What is not runtime: ``python -m tools.bench`` (benchmarks), ``tools.diffusers_twin`` (diffusers' UNet2DModel
built to our architecture, for the bench and the parity tests) and ``python -m tools.digits`` (the quickstart's
data)."""

"""Training mechanics shared by the methods: policy-gradient math, role adapters, checkpoints."""

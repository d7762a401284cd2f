"""The scheduler service: one per DP rank; batches requests and runs the model."""

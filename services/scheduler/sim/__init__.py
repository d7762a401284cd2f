"""Simulated accelerator ranks (`--device sim`): the real engine, no model; each step sleeps for
the time `cost.py` gives for its batch on a `--sim-hardware` profile."""

"""The embedded testbed: procedural data, a trained tiny DiT and an evaluator."""

"""Linear probes on hidden states across checkpoints."""

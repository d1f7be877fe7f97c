"""Checkpoint-by-checkpoint analysis of what RL changed: evaluation, behaviours, verify-token
probability, attention to earlier steps, language-switch neurons and parameter drift."""

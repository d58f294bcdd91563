"""Logging and timing helpers for the training loop."""

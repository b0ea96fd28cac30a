"""Cross-fitted fine-tuning of the speech model."""

"""Fine-tuning the speech model on the AD labels, cross-fitted (`crossfit`): one training loop (`train`) per fold,
each step's passes chosen from the card's memory (`passes`), the model and its head (`model`), what a
fine-tune is given (`settings`)."""

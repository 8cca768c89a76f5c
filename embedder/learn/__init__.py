"""Training on cached features: the linear probe, scikit-learn classifiers, finetuning, export."""

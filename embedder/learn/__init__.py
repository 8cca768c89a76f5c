"""Training on cached features and on images.

  probe.py        `LinearProbe`, the scikit-learn estimator (features in, classes out; no I/O)
  classifiers.py  scikit-learn classifiers tuned by cross-validation
  train.py        `embedder probe` / `evaluate`: `ProbeConfig`, `run_probe`, `evaluate_probe` on caches
  probefile.py    probe.pt, the saved linear probe: written by `run_probe`, read by the others
  metrics.py      accuracy, per-class precision/recall, the confusion matrix
  checkpoint.py   image -> label classifier checkpoints (`save_classifier`, `load_classifier`)
  export.py       a probe + its backbone -> one checkpoint
  predict.py      a checkpoint on image files
  finetune/       training the network itself on the images
"""

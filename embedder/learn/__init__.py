"""Training on cached features and on images.

  probe.py        `LinearProbe`, the scikit-learn estimator (features in, classes out; no I/O)
  knn.py          `KNNVote`, DINOv2's k-NN probe (a temperature-weighted vote over a FAISS search)
  classifiers.py  scikit-learn classifiers tuned by cross-validation (or on validation rows, for few-shot)
  fewshot.py      N rows per class drawn from the train split, seeded draws, mean and std
  sweep.py        `probe --layer all`: every layer of a multi-layer cache on one split, table and plot
  trainer.py      one classifier on one layer of a cache, into a staging folder (`train_probe`)
  train.py        `embedder probe` / `evaluate`: `ProbeConfig`, `run_probe`, `evaluate_probe` on caches
  probefile.py    probe.pt, the saved linear probe: written by `run_probe`, read by the others
  metrics.py      accuracy, top-k, balanced accuracy, per-class precision/recall, the confusion matrix
  checkpoint.py   image -> label classifier checkpoints (`save_classifier`, `load_classifier`)
  export.py       a probe + its backbone -> one checkpoint
  predict.py      a checkpoint on image files
  finetune/       training the network itself on the images
"""

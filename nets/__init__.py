"""lungscreen models and the shared training core (`nets.train.Learner`).

- :mod:`nets.train`: the one training loop (``Learner`` with ``fit``, ``fit_one_cycle``,
  ``lr_find``), the closed list of events, ``Callback``, ``set_seed``, ``pick_device``.
- :mod:`nets.callbacks`: every callback, imported from the package, defined one module per
  concern: ``core`` (events, ``Callback``, ``Cancel*`` exceptions; re-exported by
  ``nets.train``), ``schedule`` (schedules, one-cycle, LR finder), ``tracker`` (early stopping,
  NaN guard), ``metrics``, ``checkpoint`` (checkpoint/resume, RNG state), ``progress``
  (progress bars, CSV/JSON logging), ``mixed_precision`` (mixed precision, gradient clipping).
  The loop imports the callbacks; no callback imports the loop.
- :mod:`nets.cnn3d`: the false-positive classifier on 32 mm candidate cubes
  (``NoduleNet3D``, ``predict_tta``, ``save_classifier``/``load_classifier``).
- :mod:`nets.rnn`: the patient-level GRU over ranked candidate embeddings, trained by the same
  Learner through the ``rnn_cbs()`` callback bundle.
- :mod:`nets.data`: cube dataset and augmentation, the positive-fraction batch sampler,
  candidate-set dataset and padding collate.
"""

"""Evaluation of pretrained encoders.

- encoders from checkpoints: :mod:`~sslsky.models.loading`;
- the supervised loop of photo-z and morphology (linear probe, fine-tuning, scratch): what is predicted
  (:mod:`~sslsky.eval.task`), the network (:mod:`~sslsky.eval.backbone`), its inputs
  (:mod:`~sslsky.eval.features`), the loop (:mod:`~sslsky.eval.supervised`) and its outputs
  (:mod:`~sslsky.eval.results`);
- the tasks: :mod:`~sslsky.eval.photoz`, :mod:`~sslsky.eval.morphology` (with :mod:`~sslsky.eval.clustering`),
  their metrics (:mod:`~sslsky.eval.metrics`) and label-fraction sweeps (:mod:`~sslsky.eval.sweep`);
- similarity search: the embeddings file (:mod:`~sslsky.eval.embeddings`), ``sslsky embed``
  (:mod:`~sslsky.eval.embed`), nearest neighbours (:mod:`~sslsky.eval.neighbours`), retrieval quality
  (:mod:`~sslsky.eval.retrieval`), the neighbour grid (:mod:`~sslsky.eval.plots`) and ``sslsky search``
  (:mod:`~sslsky.eval.search`).
"""

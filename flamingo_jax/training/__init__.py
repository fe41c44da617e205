"""The model-agnostic training library every trainer (trainers/flamingo, trainers/contrastive,
trainers/lm) builds on.

It imports no trainer and no Flamingo model code: a trainer brings its loss (a grad_fn),
its parameter labels, its own metrics (extra_metrics) and FLOP model. Mesh, sharding and
parameter I/O, which evaluation and the apps use too, are in runtime/.
  optim       AdamW by label (frozen / trainable / trainable_no_decay), schedules, the split
  agc         adaptive gradient clipping (NFNet towers)
  objective   token NLL, micro-batch split, the update step with the non-finite skip
  state       the train state's layout, the compiled step, initialise or restore
  checkpoint  step checkpoints with the data-iterator state, the only orbax user of training
  mfu         peak FLOP/s per device (datasheet or measured): MFU's denominator
  metrics     metrics.jsonl (+ every step's history.jsonl) and TensorBoard
  loop        workdir files, host-side step handler, SIGTERM checkpoint, the loop itself
  prefetch    batches made and put on the devices ahead of the step, on a background thread
  cli         --config/--workdir, defaults filled once, the sections every trainer shares
"""

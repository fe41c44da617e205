"""The training library every trainer (train.py, contrastive.py, lm_pretrain.py) builds on.

It imports no trainer. docs/architecture.md draws the layers:
  sharding     mesh, logical-axis rules, parameter and batch layouts
  distributed  multi-host start-up
  optim        AdamW over trainable leaves, schedules, trainable/frozen split
  agc          adaptive gradient clipping (NFNet towers)
  objective    token NLL, weighted accumulation, the update step with the non-finite skip
  checkpoint   step checkpoints, parameter trees, the only orbax user
  flops        analytic FLOPs and MFU
  metrics      metrics.jsonl + TensorBoard
  loop         workdir files, host-side step handler, SIGTERM checkpoint, the loop itself
  prefetch     batches made and put on the devices ahead of the step, on a background thread
"""

"""On-device adaptation: a PyTorch copy of the deployed model learns from the frames it sees.

- `adapter`: OnlineAdapter, one update = EMA teacher → calibrated pseudo-weak labels → student
  step on the BN affine parameters (or more), BN statistics mixed source/test (`bn`).
- `safety`: EMA, stochastic restore, collapse monitor; `shift`: domain-shift detector.
- `worker`: the background thread beside the stream (never blocks inference, skips counted).
- `sync`, `folding`, `sync_tensorrt`: pushing the teacher into the running runtime, checked.
- `source_stats`, `package`: what export stores in the bundle for all this.
- `session`, `state`, `options`: `adapt-deploy stream --adapt` set-up, saved state, flags.
"""

"""On-device adaptation on a continual stream: does it help, does it stay stable, what does it cost?

    python -m bench.tta [--checkpoint CKPT] [--source-data DIR] [--frames 40] [--rounds 10]
                        [--methods none,bn_stats,tent,ours,ours_every_frame,ours_every_64]
                        [--fps-rounds 3] [--fps-loops 5] [--threads 2] [--set field=value ...]
                        [--name tta]

Stream: a synthetic drive (target style, 128x256, the model's evaluation size) through five
conditions, target → fog → night → rain → snow (the severities of the demo video), --frames
frames each, the same frames repeated for --rounds rounds (CoTTA's protocol, with shorter rounds
on CPU). Ground truth comes with every frame.

Model: a source-only checkpoint of the adaptation benchmark (bench.adaptation, seed 0) by default,
exported with its adaptation package (source statistics from --source-data) into
bench/.work/tta/bundle; the bundle is exported again when its meta.json records another
checkpoint (sha256) or source data than the ones given.

Methods, in one run, each from the same source weights:
- none: the bundle on ONNX Runtime, never updated.
- bn_stats: BN statistics only: every frame enters the test statistics (mixed BN, no gradient).
- tent: TENT as published: BN on each frame's own statistics, entropy minimization of the BN
  affine parameters at every frame (SGD, lr 1e-3); it runs in PyTorch, since per-frame batch
  statistics cannot be folded into a deployed engine.
- ours: the OnlineAdapter at its default setting, driving the bundle on ONNX Runtime through
  the real sync (session rebuilt from the updated weights, checked on the bundle's samples).
  Updates run inline here (deterministic): every k-th frame or on a detected shift.
- ours_every_frame / ours_every_64: the same with k = 1 (what a faster device could afford) and
  k = 64 (about the rate the time budget leaves on our 2-core CPU at full decoding speed, where
  detected shifts still get their update).
- ablations, not run by default: ours_bn_stats_only (no gradient: weak-label weight 0),
  ours_with_entropy (plus the entropy term), ours_bn_prior_0.3 (source prior λ = 0.3), and
  tent_lr_1e-4 (TENT at the other learning rate it was compared with).

Every frame is scored before that frame's update. Reported: mIoU per condition and round, the
mean, first vs last round, forgetting (the clean target frames re-scored with the final
weights, no updates, against the unadapted model), resets and sync failures. Throughput:
`adapt-deploy stream`'s pipeline (decode, segment, write stats) on a 256x512 video of
--fps-loops rounds with and without adaptation (the background worker at the default setting),
alternating --fps-rounds times; cost = 1 - with / without.
Goals: ours above none and tent on the mean; last round >= first round - 1 mIoU; cost <= 15%.
"""

"""On-device adaptation on a continual stream: does it help, does it stay stable, what does it cost?

    python -m bench.tta [--checkpoint CKPT] [--source-data DIR] [--stream drive|second]
                        [--render-seed N] [--frames N] [--rounds N]
                        [--methods none,bn_stats,tent,sar,rdumb,cotta,ours,ours_no_bank]
                        [--fps-rounds 3] [--fps-loops 5] [--threads 2] [--set field=value ...]
                        [--name tta]

Streams (bench/tta/conditions.py), synthetic drives at 128x256 (the model's evaluation size)
with ground truth for every frame, the same frames repeated round after round (CoTTA's
protocol, with shorter rounds on CPU):
- drive (default): target → fog → night → rain → snow (the demo video's severities), 40 frames
  each, 10 rounds. Every default of the adapter was set on it.
- second: never tuned on: source-style frames (home) → night 4 → target → snow 4 → noise 3 →
  fog 1 → rain 2 → motion blur 2, 64 frames each, 10 rounds (5,120 frames), another seed.
--render-seed renders a stream's conditions from another seed (other scenes, same conditions;
results tta[_second]_seedN): a margin that holds across renderings owes little to the frames.
`python -m bench.tta.renderings` tabulates ours against the best baseline on each of them.

Model: a source-only checkpoint of the adaptation benchmark (bench.adaptation, seed 0) by default,
exported with its adaptation package (source statistics from --source-data) into
bench/.work/tta/bundle; the bundle is exported again when its meta.json records another
checkpoint (sha256) or source data than the ones given.

Methods, in one run, each from the same source weights:
- none: the bundle on ONNX Runtime, never updated.
- bn_stats: BN statistics only: every frame enters the test statistics with weight 0.5 (mixed
  BN, no gradient, one state for the whole stream).
- tent: TENT as published: BN on each frame's own statistics, entropy minimization of the BN
  affine parameters at every frame (SGD, lr 1e-3); it runs in PyTorch, since per-frame batch
  statistics cannot be folded into a deployed engine.
- sar, rdumb, cotta: the continual baselines (bench/tta/baselines.py, each class's docstring
  says what its paper does and where this differs): SAR (reliable entropy, sharpness-aware
  updates, reset on a low loss), RDumb (ETA's filtered entropy, reset every 1000 frames),
  CoTTA (all weights, augmentation-averaged EMA teacher, stochastic restore; about 15x the
  cost of a frame here).
- ours: the OnlineAdapter at its default setting, driving the bundle on ONNX Runtime through
  the real sync (session rebuilt from the updated weights, checked on the bundle's samples).
  Updates run inline here (deterministic, as `stream --adapt-wait` runs them): every k-th
  frame or on a detected shift. Its
  condition bank (adapt_deploy/tta/bank.py) serves home frames the bundle's own weights and
  every other condition its own adapted state; ours_no_bank is the same with one state.
- ours_every_frame / ours_every_64 (not run by default): the same with k = 1 (what a faster
  device could afford) and k = 64 (about the rate the time budget leaves on our 2-core CPU at
  full decoding speed, where detected shifts still get their update).
- ablations, not run by default (tta_ablation.md; the command is in docs/benchmarks.md):
  ours_bn_stats_only (no gradient: every loss weight 0), ours_weak_only (the weak-label term
  alone), ours_no_fade (λ = 0 for every condition in the adapted layers), ours_all_stages
  (every BN layer adapts: source_stages 0, as before session 18, at today's fade),
  ours_bn_momentum_0.5 (each frame weighs 0.5 in the test statistics), ours_bn_prior_0.3 (λ
  at least 0.3), and
  tent_lr_1e-4 (TENT at the other learning rate it was compared with).
- probes, not run by default: ours_frame_stats_0.5 / ours_frame_stats_1: ours, each frame
  scored by the adapter's teacher in PyTorch with the frame's own BN statistics mixed in at 0.5
  / 1, as the strong baselines normalise (a folded engine cannot; tta_frame_stats_seedN.md).

Every frame is scored before that frame's update. Reported: mIoU per condition and round, the
mean, first vs last round, forgetting (after the last round the clean target frames once more,
run the same way, against the unadapted model), resets and sync failures. Throughput:
`adapt-deploy stream`'s pipeline (decode, segment, write stats) on a 256x512 video of
--fps-loops rounds with and without adaptation (the background worker at the default setting),
alternating --fps-rounds times; cost = 1 - with / without.
Goals (issue 20, checked in the report): ours' mean >= the best other method's + 1.5; on the
clean target, per round and at the end, >= none - 0.5; last round >= first round - 1; the cost
of adapting <= 15% of frames/s (measured here on the CPU; the goal is for a GPU).
"""

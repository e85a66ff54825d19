"""Training: the loop (`trainer`), AdamW and its schedule (`optim`), checkpoints (`checkpoint`),
run directories (`run_dir`), logs and plots (`logs`, `plot`), and device/precision (`device`).

Nothing is imported here, so `sample` or `chat` can load a checkpoint without pulling in the
trainer and the data pipeline.
"""

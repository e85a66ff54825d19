"""Training: the loop (`trainer`) and the validation loss it logs (`validation`), one optimizer
step's device-side records (`step`), AdamW/Muon and the learning-rate schedule (`optim`,
`schedule`), how an invocation starts or continues a run (`run_plan`), chat fine-tuning (`sft`),
what the run says (`report`), logs and plots (`logs`, `events`, `plot`), and torchrun: taking part
in it (`distributed`), gathering FSDP2 shards into whole checkpoints (`sharded_state`), starting
it for `--nproc N` (`launch`).

What inference shares with training (checkpoints, run-directory names, device and precision) is in
`tinyllm.runtime`, so `sample`, `chat`, `eval`, `export` and `serve` never import this package.
Nothing is imported here, so importing one module does not pull in the trainer and the data pipeline.
"""

"""What training and inference share: a run directory's layout (`run_dir`), reading and writing
checkpoints (`checkpoint`), and the device and precision to run on (`device`).

Why it is a package of its own: `sample`, `chat`, `eval`, `export`, `serve` and the benchmarks
load a run as much as the trainer writes one; with these here they never import `tinyllm.train`
(the loop, its optimizer, schedule and logs), except the benchmarks that train (`bench train`,
`bench quality`). Dependencies point one way: `train` imports
`runtime`, never the reverse. Nothing is imported here, so loading a checkpoint pulls in only
what it needs.
"""

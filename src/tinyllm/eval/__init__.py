"""Evaluation: held-out loss, perplexity and bits per byte (`loss`), exact-answer accuracy on
the builtin corpus's held-out questions (`qa`), and multiple-choice benchmarks scored as
lm-evaluation-harness scores them (`tasks`: HellaSwag, ARC-Easy, a user's JSONL).

Evaluation reads prepared data and calls the model; training may call it (its periodic
validation is `loss.score_batches`), never the other way round.
"""

from tinyllm.eval.loss import EvalResult, LossSum, evaluate_loss, score_batches
from tinyllm.eval.qa import QAResult, qa_accuracy

__all__ = ["EvalResult", "LossSum", "QAResult", "evaluate_loss", "qa_accuracy", "score_batches"]

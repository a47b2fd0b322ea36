"""Zero-shot task accuracy through lm-eval (EleutherAI's lm-evaluation-harness), an optional extra.

Its tasks read their datasets from the Hugging Face hub, so they need network or a filled cache;
without lm-eval or its data, the run stops before any compute with a one-line message.
"""

from __future__ import annotations

import importlib.util

from .errors import DataError
from .modules import dequantized_weights


def check_tasks_available(tasks: list[str]) -> None:
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise DataError(f"evaluate.tasks {tasks} needs lm-eval, which is not installed",
                        "pip install 'compress-lm[lm-eval]', or remove evaluate.tasks")


def task_accuracy(model, tokenizer, tasks: list[str], limit: int | None, device) -> dict[str, float]:
    """Accuracy per task (``acc_norm`` where the task reports it, else ``acc``)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    try:
        with dequantized_weights(model):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device=str(device))
            results = simple_evaluate(model=lm, tasks=tasks, limit=limit)["results"]
    except Exception as e:  # lm-eval raises many kinds; all mean "could not evaluate these tasks"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"lm-eval could not evaluate {tasks}: {first}",
                        "its datasets come from the Hugging Face hub: check the network or the HF cache") from None
    return {t: r.get("acc_norm,none", r.get("acc,none")) for t, r in results.items()}

"""Budgets: limits a recipe puts on the compressed model; a missed one fails the run (exit 1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .recipe import Budgets


@dataclass
class BudgetCheck:
    name: str
    limit: float
    actual: float | None
    passed: bool
    kind: str  # "max" | "min"

    def to_dict(self):
        return asdict(self)


def _metrics(report: dict) -> dict:
    base, comp, size = report["base"], report["compressed"], report["size"]
    return {
        "max_size_mb": size["checkpoint_bytes"] / 1e6,
        "max_bits_per_weight": size["compressed_layers_bits_per_weight"],
        "max_ppl": comp["perplexity"],
        "max_ppl_increase": comp["perplexity"] / base["perplexity"] - 1,
        "max_kl_divergence": comp.get("kl_divergence"),
        "min_top1_agreement": comp.get("top1_agreement"),
    }


def check_budgets(budgets: Budgets, report: dict) -> list[BudgetCheck]:
    metrics = _metrics(report)
    checks = []
    for name, limit in budgets.model_dump().items():
        if limit is None:
            continue
        actual = metrics[name]
        kind = "min" if name.startswith("min_") else "max"
        passed = actual is not None and (actual >= limit if kind == "min" else actual <= limit)
        checks.append(BudgetCheck(name, limit, actual, passed, kind))
    return checks

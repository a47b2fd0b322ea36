"""Budgets: limits a recipe puts on the compressed model; a missed one fails the run (exit 1)."""

from __future__ import annotations

from .recipe import Budgets
from .report.model import BudgetCheck, Report


def _metrics(report: Report) -> dict:
    base, comp, size = report.base, report.compressed, report.size
    lat, lat_base = comp.latency_ms, base.latency_ms
    tasks = comp.tasks or {}
    return {
        "min_compression_ratio": size.compression_ratio_vs_fp16,
        "max_latency_ms": lat,
        "max_latency_increase": lat / lat_base - 1 if lat is not None and lat_base else None,
        "min_task_accuracy": sum(tasks.values()) / len(tasks) if tasks else None,
        "max_size_mb": size.checkpoint_bytes / 1e6,
        "max_bits_per_weight": size.compressed_layers_bits_per_weight,
        "max_ppl": comp.perplexity,
        "max_ppl_increase": comp.perplexity / base.perplexity - 1,
        "max_kl_divergence": comp.kl_divergence,
        "min_top1_agreement": comp.top1_agreement,
    }


def check_budgets(budgets: Budgets, report: Report) -> list[BudgetCheck]:
    metrics = _metrics(report)
    checks = []
    for name, limit in budgets.model_dump().items():
        if limit is None:
            continue
        actual = metrics[name]
        kind = "min" if name.startswith("min_") else "max"
        passed = actual is not None and (actual >= limit if kind == "min" else actual <= limit)
        checks.append(BudgetCheck(name=name, limit=limit, actual=actual, passed=passed, kind=kind))
    return checks


def measures_latency(recipe) -> bool:
    b = recipe.budgets
    return recipe.evaluate.latency or b.max_latency_ms is not None or b.max_latency_increase is not None

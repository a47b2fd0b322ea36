"""The float model as a teacher: its next-token distribution over the calibration text, held in bounded memory.

Keeping the whole distribution (calibration tokens x vocabulary) is out of reach for real vocabularies (128 x 512
tokens x 49152 entries is 12.9 GB in float32), so each position keeps its ``k`` most likely tokens and their
log-probabilities; the rest of the vocabulary is one bucket holding the remaining mass. :func:`topk_kl` is the KL
divergence between the teacher's and the student's distributions coarsened to those k + 1 buckets: never more than
the full KL, equal to it when the teacher's mass is all in its top k, and zero only when the student gives every
kept token the teacher's probability.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Teacher:
    """The calibration ``tokens`` [n, seq] and, per position, the float model's ``k`` most likely next tokens
    (``indices`` [n, seq, k] int32) with their log-probabilities (``logprobs`` [n, seq, k] float32)."""

    tokens: torch.Tensor
    indices: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def from_logits(cls, tokens: torch.Tensor, logits: Iterable[torch.Tensor], k: int) -> Teacher:
        """From the float model's logits on ``tokens``, given chunk by chunk (each [chunk, seq, vocab])."""
        indices, logprobs = [], []
        for part in logits:
            top = torch.log_softmax(part.float(), dim=-1).topk(min(k, part.shape[-1]), dim=-1)
            indices.append(top.indices.to(torch.int32))
            logprobs.append(top.values)
        return cls(tokens, torch.cat(indices), torch.cat(logprobs))

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def nbytes(self) -> int:
        return self.indices.nbytes + self.logprobs.nbytes

    def rows(self, rows: slice | list[int]) -> Teacher:
        return Teacher(self.tokens[rows], self.indices[rows], self.logprobs[rows])


def topk_kl(student_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the k + 1 buckets of :class:`Teacher` (differentiable in
    ``student_logits`` [..., vocab]; ``indices`` / ``logprobs`` [..., k] on its device)."""
    logits = student_logits.float()
    idx = indices.long()
    total = torch.logsumexp(logits, dim=-1, keepdim=True)
    student_top = logits.gather(-1, idx) - total
    student_rest = torch.logsumexp(logits.scatter(-1, idx, float("-inf")), dim=-1) - total.squeeze(-1)
    teacher_p = logprobs.exp()
    teacher_rest = (1 - teacher_p.sum(-1)).clamp_min(0)  # 0 when the k tokens are the whole vocabulary
    kl = (teacher_p * (logprobs - student_top)).sum(-1) + torch.xlogy(teacher_rest, teacher_rest) \
        - teacher_rest * student_rest.clamp_min(-80.0)
    return kl.mean()

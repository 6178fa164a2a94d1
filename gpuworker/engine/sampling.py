"""Token selection: greedy for the whole batch in one op, seeded temperature/top-p per request."""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator: the same seed gives the same tokens whatever shares the batch."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Sample one token from [V] logits with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def select_tokens(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of [B, V] logits; greedy rows share a single argmax."""
    greedy = logits.argmax(dim=-1).tolist()
    for row, temp in enumerate(temperatures):
        if temp > 0.0:
            greedy[row] = sample_top_p(logits[row], temp, top_ps[row], generators[row])
    return greedy

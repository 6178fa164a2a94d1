"""Token selection: greedy for the whole batch in one op, seeded temperature/top-p per request.

Numerically safe for every row on its own: a row whose logits are not finite (an adapter with
huge weights can overflow them) gets no token but a reason, and the other rows of the batch go
on. Temperatures too small to divide by (1e-300 overflows float32 logits to inf) select greedily,
which is the limit of sampling as the temperature goes to zero.
"""

from __future__ import annotations

import torch

# Below this, logits / temperature overflows float32 for ordinary logits; the distribution is
# then a point mass on the argmax for any practical purpose, so such a row is greedy.
MIN_TEMPERATURE = 1e-4
SEED_MODULUS = 2**64  # torch seeds are unsigned 64-bit: any integer seed maps into that range


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own generator: the same seed gives the same tokens whatever shares the batch."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % SEED_MODULUS)
    return gen


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Sample one token from [V] finite logits with temperature and nucleus (top-p) filtering.

    Shifting by the maximum before dividing keeps every scaled logit <= 0 (at worst -inf), so
    the softmax always has a 1 at the top token and never yields NaN.
    """
    shifted = logits.float() - logits.max().float()
    probs = torch.softmax(shifted / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        # A top_p below float32's smallest value rounds to 0 and would drop even the top token.
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def select_tokens(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], generators: list[torch.Generator | None]
) -> tuple[list[int], dict[int, str]]:
    """One token per row of [B, V] logits, and the rows that got none with the reason.

    Greedy rows share a single argmax; the finiteness check rides in the same device-to-host
    copy, so a healthy batch pays no extra synchronisation.
    """
    finite = torch.isfinite(logits).all(dim=-1)
    greedy = torch.where(finite, logits.argmax(dim=-1), -1).tolist()
    tokens: list[int] = []
    failed: dict[int, str] = {}
    for row, token in enumerate(greedy):
        if token < 0:
            failed[row] = "the model produced non-finite logits for this request (NaN or infinity)"
            tokens.append(-1)
            continue
        temp, gen = temperatures[row], generators[row]
        if temp >= MIN_TEMPERATURE and gen is not None:
            try:
                token = sample_top_p(logits[row], temp, top_ps[row], gen)
            except RuntimeError as e:  # whatever torch refuses fails this request, not the batch
                failed[row] = f"sampling failed: {e}"
                token = -1
        tokens.append(token)
    return tokens, failed

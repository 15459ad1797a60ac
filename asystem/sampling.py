"""Token sampling for the torch engine: which token, and the log-probability it was drawn with.

IcePop divides by p_infer, the probability of the sampled token under the distribution the
engine *actually sampled from* (RING1T.md 1), so `sample` reports exactly that:

- temperature 0 (greedy): the arg-max token, and its log-softmax under the raw logits;
- temperature T > 0, top_p = 1: softmax(logits / T), and the log of its probability there;
- top_p < 1 (nucleus): the smallest set of most likely tokens whose mass under
  softmax(logits / T) reaches top_p, renormalised; the log-probability is under that
  renormalised distribution (so it is never below log of the unfiltered probability).

Randomness comes in as one Exp(1) variate per row and vocabulary entry (`noise`), and the
token is the winner of an exponential race, argmax p_i / q_i, which is distributed as p
(the Gumbel-max trick, as vLLM samples). Unlike inverse-CDF sampling, where a rounding-level
change of the probabilities moves the token whenever the uniform falls near one of V
boundaries, the race changes its winner only if its top two are within rounding of each
other. So a seeded row gives the same tokens alone or batched (`seeded_noise`).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def seeded_noise(seed: int, index: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The noise for the `index`-th response token of a request seeded `seed`: from a fresh
    generator seeded by (seed, index), so that the draw does not depend on what was sampled
    before. A seeded request thus gives the same tokens whether or not it was interrupted
    and continued, and whatever else shares its batch."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    return exponential_noise(1, vocab, torch.Generator(device).manual_seed(mixed))[0]


def exponential_noise(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Exp(1) variates, [rows, vocab], on the generator's device."""
    uniform = torch.rand(rows, vocab, generator=generator, device=generator.device)
    return torch.log1p(-uniform).neg_()


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    `logits` [B, V] (any float dtype; computed in float32); `temperature`, `top_p` [B];
    `noise` [B, V] Exp(1) variates (ignored for greedy rows; None when every row is
    greedy), all on one device. Returns (tokens [B] int64, logprobs [B] float32, bad [B]
    bool). A row whose logits hold NaN or +inf (or only -inf) is `bad`: its token and
    logprob are meaningless and the caller must fail that request, not report them.
    """
    logits = logits.float()
    bad = ~torch.isfinite(logits.amax(-1))  # NaN and +inf both survive a max
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    logprobs = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    greedy = temperature == 0
    nucleus = ~greedy & (top_p < 1)
    full = ~greedy & ~nucleus
    for rows, draw in ((greedy, _greedy), (full, _full), (nucleus, _nucleus)):
        if rows.all():  # the common case: one kind of row, no gather and scatter
            return (*draw(logits, temperature, top_p, noise), bad)
        if rows.any():
            tokens[rows], logprobs[rows] = draw(logits[rows], temperature[rows], top_p[rows], noise[rows])
    return tokens, logprobs, bad


def _greedy(logits, temperature, top_p, noise) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logits.argmax(-1)
    return tokens, _pick(logits, tokens) - logits.logsumexp(-1)


def _full(logits, temperature, top_p, noise) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = logits if bool((temperature == 1).all()) else logits / temperature[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    tokens = _race(logp.exp(), noise)
    return tokens, _pick(logp, tokens)


def _nucleus(logits, temperature, top_p, noise) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits / temperature[:, None], dim=-1)
    sorted_logp, order = logp.sort(-1, descending=True)
    sorted_p = sorted_logp.exp()
    # A token is kept when the mass of the more likely tokens is still below top_p: the
    # most likely token always is, and the set stops at the first one reaching top_p.
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]
    kept = sorted_p * keep
    position = _race(kept, noise.gather(-1, order))  # each token keeps its own variate
    return _pick(order, position), _pick(sorted_logp, position) - kept.sum(-1).log()


def _race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax p / q: entry i wins with probability p_i / sum p; a zero-mass entry never
    wins (a variate of exactly 0 is raised to the smallest normal number: no 0 / 0)."""
    return (probs / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(-1)


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index[:, None]).squeeze(-1)

"""Chi-square goodness of fit for sampled tokens, shared by the statistical tests."""
import numpy as np
import torch
from scipy import stats

ALPHA = 1e-3  # fixed seeds make every run identical; alpha only sets how strict the check is


def chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of "tokens (1-D int tensor of ids) are i.i.d. draws from probs ([V], sums to 1)".

    Tokens outside the support (probability 0) make the p-value 0 outright. Bins with an
    expected count below 5 are merged into one, as the chi-square approximation needs."""
    probs = probs.double().cpu().numpy()
    probs = probs / probs.sum()
    counts = np.bincount(tokens.cpu().numpy(), minlength=len(probs)).astype(np.float64)
    if len(counts) > len(probs) or counts[probs == 0].sum() > 0:
        return 0.0
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = list(counts[big])
    exp = list(expected[big])
    if (~big).any() and expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    if len(obs) < 2:
        return 1.0
    return float(stats.chisquare(obs, exp).pvalue)


def biased(probs: torch.Tensor, shift: float = 0.01) -> torch.Tensor:
    """probs with `shift` of mass moved from the most to the least likely supported token."""
    out = probs.clone().double()
    hi = int(out.argmax())
    lo = int(torch.where(out > 0, out, torch.full_like(out, 2.0)).argmin())
    out[hi] -= shift
    out[lo] += shift
    return out


def block_masses(probs: torch.Tensor, block: int = 256) -> torch.Tensor:
    """probs [V] summed over consecutive blocks of ``block`` ids (the two-level race's blocks)."""
    V = probs.shape[-1]
    nb = -(-V // block)
    return torch.nn.functional.pad(probs.double(), (0, nb * block - V)).view(nb, block).sum(-1)

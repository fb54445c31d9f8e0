"""The phase-wise data mixture: which phase, and which source weights, at a token count."""

from __future__ import annotations

from schedulers.fg_wsd import FGWSDSchedule, Phase

WEIGHT_TOLERANCE = 1e-6


def phase_at_tokens(schedule: FGWSDSchedule, tokens: float) -> Phase:
    """The phase in which the token count `tokens` (consumed so far) falls."""
    for phase in schedule.phases:
        if tokens < phase.start_tokens + phase.tokens:
            return phase
    return schedule.phases[-1]


def weights_at_tokens(schedule: FGWSDSchedule, tokens: float, sources: list[str]) -> dict[str, float]:
    """Every source's weight at a token count (0 for sources the phase does not use)."""
    weights = phase_at_tokens(schedule, tokens).weights
    return {s: weights.get(s, 0.0) for s in sources}


def all_sources(schedule: FGWSDSchedule) -> list[str]:
    return sorted({s for phase in schedule.phases for s, _ in phase.mixture})


def check_weights(mixture: dict[str, float]) -> str | None:
    """Why a mixture is invalid, or None."""
    if not mixture:
        return "is empty; give at least one source with a weight"
    not_numbers = [s for s, w in mixture.items()
                   if isinstance(w, bool) or not isinstance(w, (int, float))]
    if not_numbers:
        return f"the weight of {', '.join(not_numbers)} is not a number"
    negative = [s for s, w in mixture.items() if w < 0]
    if negative:
        return f"negative weight for {', '.join(negative)}"
    total = sum(mixture.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        return f"weights sum to {total:.6g}, must sum to 1"
    return None

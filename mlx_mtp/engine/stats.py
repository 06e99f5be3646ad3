"""Statistics: one typed record per generation (the stream carries it), one per batch."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class Throughput:
    """Committed tokens over wall time (of one generation, or of a whole batch)."""

    generation_tokens: int = 0
    generation_time: float = 0.0
    prompt_time: float = 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0


@dataclass
class Stats(Throughput):
    """Running statistics of one generation; the stream carries the same object."""

    prompt_tokens: int = 0
    drafts: List[List[int]] = field(default_factory=list)  # per round: proposed ids
    accepted: List[int] = field(default_factory=list)  # per round: how many were accepted
    sources: List[str] = field(default_factory=list)  # per round: who proposed
    committed: List[int] = field(default_factory=list)  # per round: how many ids it committed

    def add_round(self, drafted: List[int], accepted: int, source: str, committed: int):
        self.drafts.append(drafted)
        self.accepted.append(accepted)
        self.sources.append(source)
        self.committed.append(committed)

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def drafted_tokens(self) -> int:
        return sum(len(d) for d in self.drafts)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per target verify forward (accepted drafts + 1, except where a
        stop id or the token limit cut the round short)."""
        return sum(self.committed) / self.rounds if self.rounds else 0.0

    @property
    def per_position_acceptance(self) -> List[float]:
        """Entry i: share of rounds that proposed > i tokens whose first i + 1 were accepted."""
        return per_position(self.drafts, self.accepted)

    @property
    def by_source(self) -> dict:
        """source -> {"rounds", "drafted", "accepted", "acceptance", "per_position_acceptance",
        "draft_tokens_chosen" (K -> rounds)}: rounds that drafted nothing are no source's."""
        rounds = {}
        for d, a, s in zip(self.drafts, self.accepted, self.sources):
            if d:
                rounds.setdefault(s, []).append((d, a))
        out = {}
        for s, own in rounds.items():
            drafts, accepted = [d for d, _ in own], [a for _, a in own]
            chosen = [len(d) for d in drafts]
            out[s] = {
                "rounds": len(own),
                "drafted": sum(chosen),
                "accepted": sum(accepted),
                "acceptance": sum(accepted) / sum(chosen),
                "per_position_acceptance": per_position(drafts, accepted),
                "draft_tokens_chosen": {k: chosen.count(k) for k in sorted(set(chosen))},
            }
        return out

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @classmethod
    def pooled(cls, stats: List["Stats"]) -> "Stats":
        """One Stats over several generations: acceptance counted over all their rounds."""
        out = cls()
        for s in stats:
            out.prompt_tokens += s.prompt_tokens
            out.generation_tokens += s.generation_tokens
            out.prompt_time += s.prompt_time
            out.generation_time += s.generation_time
            out.drafts += s.drafts
            out.accepted += s.accepted
            out.sources += s.sources
            out.committed += s.committed
        return out

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prompt_time": self.prompt_time,
            "generation_time": self.generation_time,
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
            "rounds": self.rounds,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_position_acceptance": self.per_position_acceptance,
            "by_source": self.by_source,
            "drafts": self.drafts,
            "accepted": self.accepted,
            "sources": self.sources,
            "committed": self.committed,
        }


@dataclass
class BatchStats(Throughput):
    """The batch as a whole: committed tokens over wall time, and rounds run."""

    rounds: int = 0
    live_rows: List[int] = field(default_factory=list)  # per round: rows in the forward
    draft_tokens: List[int] = field(default_factory=list)  # per round: K, the most drafts of a row


def per_position(drafts: List[list], accepted: List[int]) -> List[float]:
    """Entry i: share of the rounds that proposed > i tokens whose first i + 1 were accepted."""
    out = []
    for i in range(max((len(d) for d in drafts), default=0)):
        rounds = [a for d, a in zip(drafts, accepted) if len(d) > i]
        out.append(sum(a > i for a in rounds) / len(rounds))
    return out

"""What a dynamic-patch generation did, per step and sample: read from the runtime's records."""

from __future__ import annotations

import io
from dataclasses import dataclass


@dataclass
class Summary:
    """What the last call of an enabled pipeline (or a runtime) did, per step and sample."""

    records: list[dict]
    base_size: int

    @property
    def coarse_fraction(self) -> float:
        """The fraction of (step, sample) pairs that ran coarser than the base size."""
        decisions = {(r["step"], r["sample"]): r["patch_size"] for r in self.records}
        return sum(p != self.base_size for p in decisions.values()) / max(len(decisions), 1)

    @property
    def token_saving(self) -> float:
        """1 - tokens the transformer saw / tokens the base size would have seen."""
        base = sum(r["base_tokens"] for r in self.records)
        return 1 - sum(r["tokens"] for r in self.records) / base if base else 0.0

    @property
    def cache_hits(self) -> int | None:
        """Calls of a sample that ddit's cache skipped (``None`` without a ddit cache)."""
        hits = [r["cached"] for r in self.records if r["cached"] is not None]
        return sum(hits) if hits else None

    def table(self):
        """A rich table: one row per step, each sample's patch size, signal and cache hits (x: every call of
        the sample skipped, ~: some of them, as one CFG branch; .: none; -: not known)."""
        from rich.table import Table

        table = Table(title=f"ddit: {self.coarse_fraction:.0%} of steps coarse, "
                            f"{self.token_saving:.0%} fewer tokens than patch {self.base_size}")
        for column in ("step", "sigma", "patch size per sample", "signal per sample", "cached"):
            table.add_column(column)
        steps: dict[int, dict] = {}
        cached: dict[tuple[int, int], list] = {}  # every call of the sample: its CFG branches may be calls apart
        for r in self.records:
            steps.setdefault(r["step"], {"sigma": r["sigma"]}).setdefault(r["sample"], r)
            cached.setdefault((r["step"], r["sample"]), []).append(r["cached"])
        marks = {None: "-", True: "x", False: ".", "some": "~"}
        for step, by_sample in steps.items():
            sigma = by_sample.pop("sigma")
            rows = [by_sample[s] for s in sorted(by_sample)]
            signals = [r["signals"].get(r["patch_size"]) for r in rows]
            hits = [cached[step, s] for s in sorted(by_sample)]
            table.add_row(str(step), f"{sigma:.3f}", " ".join(str(r["patch_size"]) for r in rows),
                          " ".join("-" if v is None else f"{v:.2e}" for v in signals),
                          " ".join(marks[h[0] if len(set(h)) == 1 else "some"] for h in hits))
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, file=io.StringIO())
        console.print(self.table())
        return console.file.getvalue()

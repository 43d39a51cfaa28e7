"""How close ``ddit calibrate teacache``'s delta guide comes to what the cache then skips: on the tiny random
FLUX pipeline of the tests (12 steps, true CFG), the estimated share of skipped steps at each guide delta against
the share the real cache skips at it.

    .venv/bin/python benchmarks/teacache_guide.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ddit  # noqa: E402
from tiny_pipelines import build  # noqa: E402

from ddit.caches import TeaCache, TeaCacheRecorder, delta_for_share, fit_teacache, skipped_share  # noqa: E402

STEPS = 12


def shares(pipe, kwargs, cache) -> float:
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline", cache=cache)
    try:
        pipe(**kwargs(batch=1, steps=STEPS))
        records = ddit.summary(pipe).records
    finally:
        ddit.disable(pipe)
    return sum(r["cached"] for r in records) / len(records)


def main() -> None:
    pipe, kwargs = build("flux")
    recorder = TeaCacheRecorder()
    shares(pipe, kwargs, recorder)
    fit = fit_teacache(recorder.pairs)
    print("| share asked | delta | estimated | real |\n|---|---|---|---|")
    for share in (0.2, 0.3, 0.4, 0.5, 0.6):
        delta = delta_for_share(fit, recorder.sequences, share)
        real = shares(pipe, kwargs, TeaCache(delta=delta, coefficients=fit))
        print(f"| {share:.0%} | {delta:.5g} | {skipped_share(fit, delta, recorder.sequences):.1%} | {real:.1%} |")


if __name__ == "__main__":
    main()

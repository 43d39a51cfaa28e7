"""The main job's targets (issue 5), measured on the testbed with the policies' defaults.

    pytest -s benchmarks/test_targets.py

Two resumable ``ddit-ablate`` runs: one samples the 50-step baseline and ``third_order``
alone and with TeaCache (at its default delta); the other the reference curves, the
baseline at fewer steps and TeaCache alone at several deltas. Each target is then one test
on their summaries, so a missed target fails by name and the printed lines say by how
much. Speed-ups are wall time as the harness measures it (a batch's wall time per image;
rows run interleaved batch by batch in one process), so they are ratios within one run,
each against that run's own baseline, as in the other benchmarks. The quality of a
reference "at matched speed" is interpolated on its curve (linear in log speed-up) at
``third_order``'s own speed-up.

The runs are kept in ``runs/benchmark-targets-HASH`` (HASH: the configuration), so an
interrupted benchmark resumes; delete a folder to measure afresh. The policy's defaults
are written into its run's configuration, so that new defaults make a new run instead of
resuming one sampled with the old ones, while the reference run is reused.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ddit.ablate import build_config, run_ablation, summarize
from ddit.ablate.models import fingerprint, folders, load_model
from ddit.caches.teacache import TeaCache
from ddit.policies.percentile import ThirdOrderPolicy
from ddit.testbed.data import PROMPTS
from ddit.testbed.evaluator import load_evaluator

NUM_PER_CLASS = 32
STEPS = 50
FEWER_STEPS = (34, 28, 22, 15)
TEACACHE_DELTAS = sorted({0.05, 0.1, 0.2, TeaCache.delta})
POLICY = "third_order"
#: Its defaults, spelled out in the configuration (its hash) rather than implied.
POLICY_PARAMS = {"tau": ThirdOrderPolicy.tau, "rho": ThirdOrderPolicy.rho,
                 "fine_tail": ThirdOrderPolicy.fine_tail}
#: Sample i starts from seed HELD_OUT_SEED + i: the defaults were tuned on seeds 0-127, not on these.
HELD_OUT_SEED = 10_000
RESULTS: dict[str, dict] = {}
#: Every measured value, written as the tests go (for the README's table).
RESULTS_FILE = Path(__file__).parents[1] / "runs" / "targets.json"


def _delta_tag(delta: float) -> str:
    return f"teacache[delta={delta!r}]"


def _run(config) -> dict[str, dict]:
    """Sample (or resume) one run in ``runs/benchmark-targets-HASH`` and summarize it."""
    digest = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode()).hexdigest()[:8]
    out = RESULTS_FILE.parent / f"benchmark-targets-{digest}"
    run_ablation(config, load_model(folders(None, None)), out)
    rows = {r["row"]: r for r in summarize(config, out, load_evaluator())}
    print(f"\nablation: {out}/report.md")
    return rows


@pytest.fixture(scope="module")
def summary():
    """``{row: record}``: the policy's rows and their own baseline from one run, the reference
    curves (fewer steps, TeaCache alone) from another, each sampled (or resumed) once per session.

    The reference run keeps the configuration the curves were first sampled with (issue 5),
    so a stored run is reused when the policy's defaults change; its own ``third_order`` rows
    (implicit defaults, whatever they were when it was sampled) are not read. Wall speed-ups
    are each against the baseline of the same run; images, FLOPs and quality do not depend on
    the run.
    """
    settings = dict(steps=STEPS, num_per_class=NUM_PER_CLASS, seed=HELD_OUT_SEED, guidance=2.0, batch_size=64,
                    model=fingerprint(folders(None, None)))
    teacache = {"teacache": {"delta": TEACACHE_DELTAS}}
    references = _run(build_config([POLICY], ["none", "teacache"], fewer_steps=FEWER_STEPS, sweeps=teacache,
                                   **settings))
    config = build_config([POLICY], ["none", "teacache"], fewer_steps=(), policy_params={POLICY: POLICY_PARAMS},
                          **settings)  # the policy alone and with TeaCache at its default delta
    config.rows = {k: r for k, r in config.rows.items() if r.policy != "baseline" or r.cache == "none"}
    ours = _run(config)
    return {**{k: v for k, v in references.items() if k.startswith("baseline")}, **ours}


def at_speed(points: list[tuple[float, float]], speedup: float) -> float | None:
    """A curve's quality at ``speedup`` (linear in log speed-up), None outside the curve."""
    speed, quality = np.array(sorted(points)).T
    if not speed[0] <= speedup <= speed[-1]:
        return None
    return float(np.interp(np.log(speedup), np.log(speed), quality))


def record(name: str, **values) -> None:
    RESULTS[name] = values
    RESULTS_FILE.write_text(json.dumps(RESULTS, indent=1))
    print(f"\n{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in values.items()))


def test_third_order_alone(summary):
    """>= 2x wall over the 50-step baseline, FD <= 1.1x the baseline's, adherence within 2 points."""
    base, row = summary["baseline"], summary[POLICY]
    record(POLICY, speedup_wall=row["speedup_wall"], speedup_flops=row["speedup_flops"],
           fd=row["fd"], fd_ratio=row["fd"] / base["fd"], adherence=row["adherence"],
           adherence_baseline=base["adherence"], ssim=row["ssim_vs_baseline"],
           coarse_steps=row["coarse_step_fraction"])
    assert row["speedup_wall"] >= 2
    assert row["fd"] <= 1.1 * base["fd"]
    assert row["adherence"] >= base["adherence"] - 0.02


def test_third_order_with_teacache(summary):
    """>= 3x wall with TeaCache at its default delta."""
    row = summary[f"{POLICY}+teacache"]
    record(f"{POLICY}+teacache", speedup_wall=row["speedup_wall"], speedup_flops=row["speedup_flops"],
           fd=row["fd"], adherence=row["adherence"], ssim=row["ssim_vs_baseline"])
    assert row["speedup_wall"] >= 3


@pytest.mark.parametrize("reference", ["fewer_steps", "teacache"])
@pytest.mark.parametrize("quality", ["ssim_vs_baseline", "fd"])
def test_third_order_beats_the_reference_at_matched_speed(summary, reference, quality):
    """Higher SSIM to the baseline, and lower FD, than the reference curve at third_order's speed-up."""
    if reference == "fewer_steps":
        keys = ["baseline", *(f"baseline@{s}" for s in FEWER_STEPS)]
    else:
        keys = ["baseline", *(f"baseline+{_delta_tag(d)}" for d in TEACACHE_DELTAS)]
    row = summary[POLICY]
    theirs = at_speed([(summary[k]["speedup_wall"], summary[k][quality]) for k in keys], row["speedup_wall"])
    record(f"{POLICY} vs {reference} ({quality})", speedup_wall=row["speedup_wall"], ours=row[quality],
           theirs=theirs)
    assert theirs is not None, f"the {reference} curve does not reach {row['speedup_wall']:.2f}x"
    assert row[quality] > theirs if quality == "ssim_vs_baseline" else row[quality] < theirs


def test_simple_classes_get_coarser_schedules(summary):
    """Mean patch size per class, simplest (glow) to most detailed (stripes): glow's above stripes'."""
    sizes = {prompt: summary[POLICY]["per_class"][prompt]["mean_patch_size"] for prompt in PROMPTS}
    record(f"{POLICY} mean patch size per class", **sizes)
    assert sizes["glow"] > sizes["stripes"]

"""Signals beyond the paper's (issue 11, part 4), each compared with ``third_order`` at the same token cost.

    python benchmarks/signal_variants.py [--seed 0] [--out runs/signal-variants]
    python benchmarks/signal_variants.py --variants "" --holds 8,16 --fraction 0.488 --out runs/probed

Every variant keeps the paper's rule (Eq. 5, restarts, the percentile over patches) and
changes only the signal, by overriding ``ThirdOrderPolicy.signals``:

- ``relative_third_order``: the per-patch std of the third difference over that of the
  first: curvature relative to speed, so it does not shrink with the step size as the
  third difference does (~(1/steps)^3);
- ``x0_third_order``: the third difference of the predicted clean image
  x0 = z_k - sigma_k v_k (v_k from two consecutive latents) instead of the latent: the
  latent's own difference mixes the noise still to be removed with the content;
- ``smoothed_third_order``: the paper's signal, averaged over steps (exponential, weight
  ``smoothing`` on the past): one step's jitter should not flip the size.

``--holds`` adds the built-in ``probed_third_order`` at those holds: the paper's signal
read only off latents the base size made (the signal is the paper's; which latents it is
read from changes). ``--fraction`` sets the token cost the variants are calibrated for; the
default, ``third_order``'s replayed on base-schedule signals, is well below what it costs in
its own run (0.32 against 0.49 on the testbed), and is out of reach for a rule that must
probe at the base size.

Per-region decisions are not tried: a sample runs at one patch size per step (the
adapter has no mixed-size tokens).

Costs are matched by calibration, not by guessing taus: each policy, ``third_order``
included, first runs the base schedule on 8 calibration samples per class (seeds apart
from the rows'), recording its signals; ``calibrate_tau`` then replays its rule for the
token fraction of ``third_order`` at its default tau on the same samples. The rows
(the baseline and each policy at its calibrated tau) are one resumable ``ddit-ablate``
run; a variant wins when it is as fast (FLOPs, within 5%) and its FD's 90% interval lies
below ``third_order``'s. The calibration replays the rule on base-schedule signals, so the
cost a variant reaches in its own run can differ (a coarse step changes the signals that
follow): the printed FLOP speed-ups say how well the costs matched. Winners are then
measured on held-out seeds (``--seed 10000``) before anything ships.
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

import torch
from scipy.stats import kendalltau

import ddit.ablate
from ddit.ablate.models import folders, load_model
from ddit.policies import ProbedThirdOrderPolicy, ThirdOrderPolicy, calibrate_tau, patch_std
from ddit.policies.differences import finite_difference
from ddit.testbed.base_model import generate
from ddit.testbed.data import PROMPTS
from ddit.testbed.evaluate import balanced_labels

#: The oracle's mean patch size per class at third_order's token cost (docs/policies.md, seeds 0-127).
ORACLE_MEAN_PATCH = {"glow": 3.96, "moon": 3.74, "shapes": 3.64, "stripes": 2.76}
CALIBRATION_PER_CLASS = 8
CALIBRATION_SEED = 50_000


class RelativeThirdOrder(ThirdOrderPolicy):
    """Per patch, std of the third difference over std of the first."""

    name = "relative_third_order"

    def signals(self) -> torch.Tensor:
        latents = torch.stack(tuple(self.history))
        third, first = finite_difference(latents, 3)[-1], finite_difference(latents[-2:], 1)[-1]
        return torch.stack([self.aggregate(patch_std(third, p) / patch_std(first, p).clamp_min(1e-12))
                            for p in self.candidates])


class X0ThirdOrder(ThirdOrderPolicy):
    """The third difference of the predicted clean images of the last four steps."""

    name = "x0_third_order"

    def __init__(self, tau=None, rho=None, warmup=None, restart=True, fine_tail=None):
        super().__init__(tau=tau, rho=rho, warmup=4 if warmup is None else warmup, restart=restart,
                         fine_tail=fine_tail)

    def reset(self, batch_size, base_size, candidates):
        super().reset(batch_size, base_size, candidates)
        self.history = deque(maxlen=self.order + 2)  # four x0 need five latents
        self.sigmas = deque(maxlen=self.order + 2)

    def choose(self, step):
        self.sigmas.append(float(step.sigma))
        return super().choose(step)

    def signals(self) -> torch.Tensor:
        z = torch.stack(tuple(self.history))
        s = torch.tensor(tuple(self.sigmas)).view(-1, *[1] * self.history[0].dim())
        velocity = (z[1:] - z[:-1]) / (s[1:] - s[:-1])  # the step from z_k to z_k+1
        x0 = z[:-1] - s[:-1] * velocity
        third = finite_difference(x0, 3)[-1]
        return torch.stack([self.aggregate(patch_std(third, p)) for p in self.candidates])


class SmoothedThirdOrder(ThirdOrderPolicy):
    """The paper's signal, exponentially averaged over steps."""

    name = "smoothed_third_order"
    smoothing = 0.5

    def __init__(self, tau=None, rho=None, warmup=None, restart=True, fine_tail=None, smoothing=None):
        super().__init__(tau=tau, rho=rho, warmup=warmup, restart=restart, fine_tail=fine_tail)
        self.smoothing = type(self).smoothing if smoothing is None else smoothing

    def reset(self, batch_size, base_size, candidates):
        super().reset(batch_size, base_size, candidates)
        self.average = None

    def signals(self) -> torch.Tensor:
        now = super().signals()
        self.average = now if self.average is None else self.smoothing * self.average + (1 - self.smoothing) * now
        return self.average


def probed(hold: int) -> type[ProbedThirdOrderPolicy]:
    """``probed_third_order`` at one hold, under its own name (a run has one row per policy name)."""
    return type(f"ProbedThirdOrderHold{hold}", (ProbedThirdOrderPolicy,), {"name": f"probed_third_order_h{hold}",
                                                                      "hold": hold})


VARIANTS = [RelativeThirdOrder, X0ThirdOrder, SmoothedThirdOrder]
#: tau below every signal: the base schedule, recording signals for calibration.
NEVER = 1e-30
#: A variant must be at least this fraction of third_order's FLOP speed-up for its FD to count.
MATCHED = 0.95


def calibrate(model, policy_class, fraction: float | None, steps: int, guidance: float) -> tuple[float, float]:
    """(tau, token fraction): tau for ``fraction`` of the base tokens, or, when None, the
    fraction the class's default tau costs on the same recorded signals."""
    labels = balanced_labels(CALIBRATION_PER_CLASS * 4)
    recorder = policy_class(tau=NEVER)
    generate(model, labels, seed=CALIBRATION_SEED, steps=steps, guidance=guidance, policy=recorder,
             batch_size=len(labels))
    if fraction is None:
        rule = policy_class()
        fraction = token_fraction(recorder.trace, rule)
        return rule.tau, fraction
    return calibrate_tau([recorder.trace], fraction, rule=policy_class()), fraction


def token_fraction(trace, rule) -> float:
    """The token cost of ``rule`` replayed on a recorded trace, as a fraction of the base's."""
    candidates = sorted(next(d for d in trace if d.signals).signals)
    rule.reset(len(trace[0].sizes), candidates[0], candidates)
    spent = steps = 0
    for d in trace:
        sizes = rule.schedule(torch.stack([d.signals[p] for p in candidates]) if d.signals else None,
                              rule.protected(d.index, len(trace)))
        spent += sum((candidates[0] / p) ** 2 for p in sizes.tolist())
        steps += len(sizes)
    return spent / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="first sample seed (0: tuning; 10000: held out)")
    parser.add_argument("--out", default="runs/signal-variants")
    parser.add_argument("--num-per-class", type=int, default=32)
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    parser.add_argument("--fraction", type=float, help="token fraction the variants are calibrated for (default: "
                        "third_order's at its default tau, replayed on the calibration samples)")
    parser.add_argument("--holds", default="", help="also ProbedThirdOrder at these holds, e.g. 8,16")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if v.name in args.variants.split(",")]
    variants += [probed(int(h)) for h in args.holds.split(",") if h]
    steps, guidance = 50, 2.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(folders(None, None))
    taus_file = out / "taus.json"
    taus = json.loads(taus_file.read_text()) if taus_file.exists() else {}
    if ThirdOrderPolicy.name not in taus:
        tau, fraction = calibrate(model, ThirdOrderPolicy, None, steps, guidance)
        taus[ThirdOrderPolicy.name] = {"tau": tau, "fraction": fraction}
    fraction = args.fraction or taus[ThirdOrderPolicy.name]["fraction"]
    for variant in variants:
        if taus.get(variant.name, {}).get("fraction") != fraction:  # calibrated for another target: again
            tau, _ = calibrate(model, variant, fraction, steps, guidance)
            taus[variant.name] = {"tau": tau, "fraction": fraction}
        taus_file.write_text(json.dumps(taus, indent=1))
    print(f"token fraction of third_order at its default on the calibration samples: "
          f"{taus[ThirdOrderPolicy.name]['fraction']:.3f}; the variants' target: {fraction:.3f}")
    policies = [ThirdOrderPolicy()] + [v(tau=taus[v.name]["tau"]) for v in variants]
    rows = ddit.ablate.run(out / f"seed{args.seed}", policies, ["none"], model=model, fewer_steps=(),
                           num_per_class=args.num_per_class, seed=args.seed, guidance=guidance, steps=steps,
                           batch_size=64)
    third = next(r for r in rows if r["row"] == ThirdOrderPolicy.name)
    print(f"{'row':24s} {'tau':>9s} {'x FLOPs':>8s} {'FD':>6s} {'FD 90% CI':>15s} {'adherence':>9s} "
          f"{'mean patch ' + '/'.join(PROMPTS):>36s} {'order vs oracle':>15s}  wins")
    for r in rows:
        low, high = r["fd_interval"]
        wins = (r["policy"] in taus and r["row"] != third["row"] and high < third["fd_interval"][0]
                and r["speedup_flops"] >= MATCHED * third["speedup_flops"])
        tau = taus.get(r["policy"], {}).get("tau", float("nan"))
        mean_patch = [r["per_class"][p]["mean_patch_size"] for p in PROMPTS]
        patches = " / ".join(f"{m:.2f}" for m in mean_patch)
        agreement = kendalltau(mean_patch, [ORACLE_MEAN_PATCH[p] for p in PROMPTS]).statistic
        print(f"{r['row']:24s} {tau:9.3g} {r['speedup_flops']:8.2f} {r['fd']:6.1f} {low:7.1f}-{high:<7.1f} "
              f"{r['adherence']:9.3f} {patches:>36s} {agreement:+15.2f}  {'yes' if wins else ''}")


if __name__ == "__main__":
    main()

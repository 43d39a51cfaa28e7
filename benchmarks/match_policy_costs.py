"""Set the ablation policies' tau to the compute of ``third_order`` at its default, on the testbed.

    python benchmarks/match_policy_costs.py [--num-per-class 8]

``second_order``, ``first_order`` and ``mean`` are ablations of ``third_order``; they are
only comparable at equal cost. This samples base-size trajectories of the shipped testbed
model (seeds 0.., balanced classes, 50 steps, guidance 2), drives every policy over the
recorded latents from plain tensors, and prints, for each, the tau whose schedule
(replayed with ``calibrate_tau``, restarts included) costs what ``third_order`` at its
default costs on the same trajectories, in tokens. The schedule's effect on later latents
is ignored, as in the ``budget`` policy. docs/policies.md records the output.
"""

import argparse

import torch

from ddit.policies import PatchPolicy, Step, calibrate_tau, get_policy
from ddit.testbed.adapter import load_multipatch_model
from ddit.testbed.base_model import generate
from ddit.testbed.evaluate import balanced_labels

ABLATIONS = ("second_order", "first_order", "mean")


class Recorder(PatchPolicy):
    """Always the base size; keeps every latent it is shown."""

    name = "recorder"

    def reset(self, batch_size, base_size, candidates):
        super().reset(batch_size, base_size, candidates)
        self.latents, self.sigmas = [], []

    def choose(self, step):
        self.latents.append(step.latent.clone())
        self.sigmas.append(step.sigma)
        return self.base_size, {}


def replay(policy: PatchPolicy, recorder: Recorder, candidates) -> list:
    policy.reset(recorder.batch_size, candidates[0], candidates)
    steps = len(recorder.latents)
    for i, (z, sigma) in enumerate(zip(recorder.latents, recorder.sigmas)):
        policy.decide(Step(i, steps, sigma, sigma * 1000, z))
    return policy.trace


def token_fraction(trace, base: int) -> float:
    sizes = torch.stack([d.sizes for d in trace]).float()
    return ((base / sizes) ** 2).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-per-class", type=int, default=8)
    args = parser.parse_args()
    model = load_multipatch_model()
    candidates = model.patch_sizes
    recorder = Recorder()
    labels = balanced_labels(4 * args.num_per_class)
    generate(model, labels, seed=0, steps=50, guidance=2.0, policy=recorder, batch_size=len(labels))

    reference = get_policy("third_order")
    target = token_fraction(replay(reference, recorder, candidates), candidates[0])
    print(f"third_order (tau={reference.tau}, rho={reference.rho}): {target:.3f} of the base tokens, "
          f"replayed on {len(labels)} base-size trajectories")
    for name in ABLATIONS:
        recording = get_policy(name, tau=1e-30)  # never coarse: only records its signals
        trace = replay(recording, recorder, candidates)
        tau = calibrate_tau([trace], target, rule=get_policy(name))
        check = token_fraction(replay(get_policy(name, tau=tau), recorder, candidates), candidates[0])
        print(f"{name}: tau={tau:.3g} ({check:.3f} of the base tokens)")


if __name__ == "__main__":
    main()

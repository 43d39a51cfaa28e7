"""Where the adapter's patch-4 error lives, and whether a linear map of the latent removes it.

    python benchmarks/adapter_error_anatomy.py      # about 40 s, one thread

On 64 held-out images at every 5th of the sampler's 50 noise levels, the relative error
||student - teacher|| / ||teacher|| of the shipped adapter at patch 4 is split into its
part constant over each 4x4 patch (what a coarse token's mean carries) and the rest (detail
inside the patch). Then the best linear correction per noise level, fitted on half the
images and scored on the other half, of three inputs: a 1x1 channel map of z_t (the
paper's residual, fitted per t), a 3x3 neighbourhood of z_t, and that plus the student's
own output. Results: docs/adapter.md, "Where the error is".
"""
import torch, torch.nn.functional as F
from ddit.testbed.adapter import load_multipatch_model
from ddit.testbed.adapter_card import HELD_OUT_SEED
from ddit.testbed.data import make_dataset
from ddit.distill import sampler_sigmas
torch.set_num_threads(1)
m = load_multipatch_model()
sig = sampler_sigmas(50)[::5]
num = 64
images, labels = make_dataset(num, HELD_OUT_SEED)
noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
P = 4
def pool(x): return F.interpolate(F.avg_pool2d(x, P), scale_factor=P, mode="nearest")
with torch.no_grad():
  for s in sig.tolist():
    z = (1 - s) * images + s * noise
    kw = dict(timestep=torch.full((num,), s * 1000), class_labels=labels, return_dict=False)
    T = m(z, **kw)[0]; S = m(z, patch_size=P, **kw)[0]
    e = S - T; n = T.norm()
    lo = pool(e).norm() / n; hi = (e - pool(e)).norm() / n
    # best per-t linear fix from features of z (fit on first half, eval on second)
    feats = [z, z - pool(z)]  # 1x1 on z and its in-patch detail
    unf = F.unfold(z, 3, padding=1).view(num, 27, 32, 32)
    def fit(X):
        Xa, Xb = X[:num//2], X[num//2:]
        A = Xa.movedim(1, -1).reshape(-1, X.shape[1]); y = (-e[:num//2]).movedim(1, -1).reshape(-1, 3)
        W = torch.linalg.lstsq(A, y).solution
        fix = (Xb.movedim(1, -1) @ W).movedim(-1, 1)
        return ((e[num//2:] + fix).norm() / T[num//2:].norm()).item()
    base = (e[num//2:].norm() / T[num//2:].norm()).item()
    r1 = fit(torch.cat([z, torch.ones_like(z[:, :1])], 1))
    r2 = fit(torch.cat([unf, torch.ones_like(z[:, :1])], 1))
    r3 = fit(torch.cat([unf, S, torch.ones_like(z[:, :1])], 1))
    print(f"t={s:.2f} err={base:.3f} lowfreq={lo:.3f} inpatch={hi:.3f} | "
          f"+1x1(z)_t={r1:.3f} +3x3(z)_t={r2:.3f} +3x3(z),S={r3:.3f}", flush=True)

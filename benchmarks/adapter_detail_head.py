"""Can a small nonlinear head, per coarse token, recover the detail inside a patch?

    python benchmarks/adapter_detail_head.py        # about 9 minutes, one thread

An upper-bound probe for a "detail head" on top of the shipped adapter: an MLP per 4x4
patch that sees the patch of z_t, the adapter's patch-4 output there and t, and adds a
correction. Trained (3000 steps, batch 128) on 6144 training images noised at random
sampler levels against the patch-2 teacher, scored on 64 held-out images per noise
level. It only sees its own patch, as a head inside the adapter would. Results:
docs/adapter.md, "Where the error is".
"""
import torch, torch.nn as nn, torch.nn.functional as F, time
from ddit.testbed.adapter import load_multipatch_model
from ddit.testbed.adapter_card import HELD_OUT_SEED
from ddit.testbed.data import make_dataset
from ddit.distill import sampler_sigmas
torch.set_num_threads(1); torch.manual_seed(0)
m = load_multipatch_model(); P = 4
sig = sampler_sigmas(50)
def make(n, seed, ts):
    images, labels = make_dataset(n, seed)
    g = torch.Generator().manual_seed(seed + 99)
    noise = torch.randn(images.shape, generator=g)
    t = ts if ts is not None else sig[torch.randint(50, (n,), generator=g)]
    z = (1 - t.view(-1,1,1,1)) * images + t.view(-1,1,1,1) * noise
    out = []
    with torch.no_grad():
        for i in range(0, n, 128):
            kw = dict(timestep=t[i:i+128] * 1000, class_labels=labels[i:i+128], return_dict=False)
            out.append((m(z[i:i+128], **kw)[0], m(z[i:i+128], patch_size=P, **kw)[0]))
    T = torch.cat([a for a, _ in out]); S = torch.cat([b for _, b in out])
    return z, S, T, t
t0 = time.time()
tr = make(6144, 0, None)
lv = sig[::5]; nh = 64
ho = make(nh * len(lv), HELD_OUT_SEED, lv.repeat_interleave(nh))
print("data", time.time() - t0, flush=True)
def patches(x): return F.unfold(x, P, stride=P).transpose(1, 2)  # B, L, 48
class Head(nn.Module):
    def __init__(s, h=256):
        super().__init__()
        s.net = nn.Sequential(nn.Linear(97, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 48))
        nn.init.zeros_(s.net[-1].weight); nn.init.zeros_(s.net[-1].bias)
    def forward(s, z, S, t):
        x = torch.cat([patches(z), patches(S), t.view(-1,1,1).expand(-1, 64, 1)], -1)
        return S + F.fold(s.net(x).transpose(1, 2), 32, P, stride=P)
head = Head(); opt = torch.optim.AdamW(head.parameters(), 1e-3)
z, S, T, t = tr
for step in range(3000):
    i = torch.randint(len(z), (128,))
    loss = F.mse_loss(head(z[i], S[i], t[i]), T[i]); opt.zero_grad(); loss.backward(); opt.step()
    if step % 500 == 0: print(step, loss.item(), flush=True)
z, S, T, t = ho
with torch.no_grad():
    R = head(z, S, t)
for k, s in enumerate(lv.tolist()):
    sl = slice(k*nh, (k+1)*nh)
    before, after = ((S[sl] - T[sl]).norm() / T[sl].norm()).item(), ((R[sl] - T[sl]).norm() / T[sl].norm()).item()
    print(f"t={s:.2f} adapter={before:.3f} +head={after:.3f}")

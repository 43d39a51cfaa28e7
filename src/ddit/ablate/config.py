"""What an ablation runs: its rows (policy x cache x steps) and the sampling settings they share.

The configuration is written to ``config.json`` before the first sample and is the
identity of an output folder: results are only ever resumed under the same one,
since mixing samples of two configurations would make every comparison wrong.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..caches import available_caches, diffusers_caches, get_cache, load_teacache_fit
from ..caches.teacache import PUBLISHED_FITS, resolve_fit
from ..checkpoint import write_text_atomic
from ..policies import available_policies, get_policy, spectral_switch
from ..testbed.data import PROMPTS, make_dataset
from ..testbed.evaluate import balanced_labels
from ..testbed.teacache import TESTBED_FIT

#: The row every other row is compared with: the base model at its own patch size, no cache.
BASELINE = "baseline"
NO_CACHE = "none"
PROGRESSIVE = "progressive"
#: The paper's fewer-step baselines (Table 1: FLUX at 28 and 15 instead of 50 steps).
FEWER_STEPS = (28, 15)
#: Training images whose power spectrum sets a ``delta=`` progressive row's switch (the spectral rule).
SPECTRUM_IMAGES = 1024


@dataclass(frozen=True)
class Row:
    """One way of sampling: a patch policy (``baseline`` = none), a cache (``none``) and a step count.

    ``policy_tag`` and ``cache_tag`` name the swept parameters (``[tau=0.0005]``), so that
    variants of one policy or cache are rows of their own.
    """

    policy: str
    cache: str
    steps: int
    policy_params: dict = field(default_factory=dict)
    cache_params: dict = field(default_factory=dict)
    policy_tag: str = ""
    cache_tag: str = ""

    def key(self, main_steps: int) -> str:
        """A short, file-name-safe name: ``third_order+teacache``, ``baseline@28``,
        ``third_order[tau=0.0005]``."""
        cache = "" if self.cache == NO_CACHE else f"+{self.cache}{self.cache_tag}"
        steps = "" if self.steps == main_steps else f"@{self.steps}"
        return f"{self.policy}{self.policy_tag}{cache}{steps}"

    def make_policy(self):
        """A fresh policy (None for the baseline: the backbone runs untouched)."""
        return None if self.policy == BASELINE else get_policy(self.policy, **self.policy_params)

    def make_cache(self, testbed: bool = True):
        """A fresh cache (None for ``none``); on the testbed, TeaCache gets the testbed's fit unless
        given coefficients (a pipeline's run must give its own)."""
        params = dict(self.cache_params)
        if self.cache == "teacache" and testbed:
            params.setdefault("coefficients", load_teacache_fit(TESTBED_FIT))
        hooks = diffusers_caches()
        if self.cache in hooks:  # a pipeline's row: ddit.enable takes the config
            return hooks[self.cache](**params)
        return get_cache(self.cache, **params)


@dataclass
class AblationConfig:
    """Rows and the settings that every row shares, so that sample i of every row has the
    same seed and label and can be compared with its baseline twin.

    ``batch_size``, ``device`` and ``dtype`` are part of the identity: a cache or a policy may
    decide per batch, and timings and outputs depend on all three. ``model`` identifies the
    weights (see ``models.fingerprint``).
    """

    rows: dict[str, Row]
    steps: int = 50
    num_per_class: int = 64
    seed: int = 0
    guidance: float = 2.0
    batch_size: int = 64
    model: dict = field(default_factory=dict)
    device: str = "cpu"  # where the model runs, and in which dtype: both change timings and outputs
    dtype: str = "float32"

    @property
    def num_samples(self) -> int:
        return self.num_per_class * len(PROMPTS)

    def labels(self) -> torch.Tensor:
        return balanced_labels(self.num_samples)

    def to_json(self) -> dict:
        return json.loads(json.dumps({**asdict(self), "classes": list(PROMPTS)}))


def build_config(policies: list[str], caches: list[str], *, steps: int = 50,
                 fewer_steps: tuple[int, ...] = FEWER_STEPS, progressive: tuple[float | str, ...] = (),
                 policy_params: dict | None = None, cache_params: dict | None = None, sweeps: dict | None = None,
                 **settings) -> AblationConfig:
    """The testbed's ablation: ``build_rows`` and the sampling settings they share."""
    rows = build_rows(policies, caches, steps=steps, fewer_steps=fewer_steps, progressive=progressive,
                      policy_params=policy_params, cache_params=cache_params, sweeps=sweeps,
                      check=lambda: _check_settings(policies, caches, **settings))
    return AblationConfig(rows=rows, steps=steps, **settings)


def progressive_switches(entries: tuple[float | str, ...], testbed: bool = True) -> dict[str, float]:
    """``{row tag: switch}`` for ``--progressive`` entries: a switch noise level (``0.4``), or
    ``"delta=0.05"``: the paper's spectral rule at that tolerance, on the testbed's training images."""
    switches = {}
    for entry in entries:
        if isinstance(entry, str) and entry.startswith("delta="):
            if not testbed:
                raise ValueError(f"--progressive {entry}: the spectral rule needs clean latents of your images; "
                                 "compute the switch with ddit.policies.spectral_switch(latents, delta) and give "
                                 "it (e.g. --progressive 0.45)")
            try:
                delta = float(entry.removeprefix("delta="))
            except ValueError:
                raise ValueError(f"--progressive {entry}: delta must be a number, e.g. delta=0.05") from None
            images, _ = make_dataset(SPECTRUM_IMAGES, seed=0)
            # rounded: the fit's last bits vary with threading, and a resumed run must see the same configuration
            switches[f"[delta={delta!r}]"] = round(spectral_switch(images, delta), 4)
        else:
            try:
                switch = float(entry)
            except ValueError:
                raise ValueError(f"--progressive {entry}: give a switch noise level in (0, 1] (e.g. 0.4) or the "
                                 "spectral rule's tolerance (e.g. delta=0.05)") from None
            switches[f"[switch={switch!r}]"] = switch
    return switches


def build_rows(policies: list[str], caches: list[str], *, steps: int = 50,
               fewer_steps: tuple[int, ...] = FEWER_STEPS, progressive: tuple[float | str, ...] = (),
               policy_params: dict | None = None, cache_params: dict | None = None, sweeps: dict | None = None,
               check=None, testbed: bool = True) -> dict[str, Row]:
    """The rows of an ablation: the baseline, the baseline at each fewer step count below
    ``steps``, progressive resolution at each ``progressive`` entry (the other training-free
    reference: a switch noise level, or ``"delta=0.05"`` for the spectral rule's), then
    (baseline and every policy) x every cache; ``none`` = no cache.

    ``sweeps`` (``{name: {param: [values]}}``, a policy's or a cache's) turn one policy or cache
    into one variant per value (per combination, for several parameters). Names and
    parameters are checked here, by building each policy and cache once, so that a typo
    fails before any model is loaded; ``check()`` runs the caller's own checks after the
    names' and before the rows'.
    """
    policy_params, cache_params, sweeps = policy_params or {}, cache_params or {}, sweeps or {}
    fit = cache_params.get("teacache", {}).get("coefficients")
    if isinstance(fit, (str, os.PathLike)):  # a fit file or a published fit: its numbers (a resumed run on a
        teacache = {**cache_params["teacache"], "coefficients": resolve_fit(fit)}  # re-fitted file is refused,
        if str(fit) in PUBLISHED_FITS:  # not mixed), and a published fit's own delta
            teacache.setdefault("delta", PUBLISHED_FITS[str(fit)]["delta"])
        cache_params = {**cache_params, "teacache": teacache}
    _check_names("patch policy", policies, available_policies())
    hooks = [c for c in caches if c in diffusers_caches()]
    if testbed and hooks:
        raise ValueError(f"{', '.join(hooks)}: diffusers' cache hooks run in pipeline ablations only (--pipeline); "
                         "on the testbed, use ddit's caches")
    _check_names("cache", caches, {NO_CACHE: None, **available_caches(), **diffusers_caches()})
    _check_params("--policy-param", policy_params, [p for p in policies if p != BASELINE])
    _check_params("--cache-param", cache_params, [c for c in caches if c != NO_CACHE])
    _check_params("--sweep", sweeps, [n for n in (*policies, *caches) if n not in (BASELINE, NO_CACHE)])
    if not testbed and PROGRESSIVE in policies and any(c != NO_CACHE for c in caches):
        raise ValueError("progressive resolution runs the stock pipeline (ddit.progressive_call), which takes no "
                         "cache: in a pipeline ablation give it as --progressive SWITCH (a row of its own) and drop "
                         "it from --policies, or drop the caches")
    if not steps > 0 or any(s <= 0 for s in fewer_steps):
        raise ValueError(f"step counts must be positive, got --steps {steps}, --fewer-steps {fewer_steps}")
    if check is not None:
        check()

    rows = [Row(BASELINE, NO_CACHE, steps)]
    rows += [Row(BASELINE, NO_CACHE, s) for s in fewer_steps if s < steps]
    rows += [Row(PROGRESSIVE, NO_CACHE, steps, {"switch": switch}, policy_tag=tag)
             for tag, switch in progressive_switches(progressive, testbed).items()]
    rows += [Row(p, c, steps, p_params, c_params, p_tag, c_tag)
             for p in dict.fromkeys([BASELINE, *policies])
             for p_tag, p_params in _variants(p, policy_params.get(p, {}), sweeps.get(p, {}))
             for c in dict.fromkeys(caches)
             for c_tag, c_params in _variants(c, cache_params.get(c, {}), sweeps.get(c, {}))]
    rows = {row.key(steps): row for row in rows}  # the baseline may come twice
    if len(rows) == 1:
        raise ValueError("nothing to compare: the only row is the baseline; give a policy (e.g. --policies "
                         "third_order), a cache (e.g. --caches teacache), --fewer-steps or --progressive")
    for row in rows.values():
        for what, make in (("policy", row.make_policy), ("cache", lambda: row.make_cache(testbed))):
            try:
                made = make()
            except TypeError as err:  # an unknown keyword: the constructor names it
                raise ValueError(f"bad parameters for {what} {getattr(row, what)!r}: {err}") from None
            warmup = getattr(made, "warmup", 0) if what == "policy" else 0
            if warmup >= row.steps:
                raise ValueError(f"--steps {row.steps} is not more than {row.policy}'s warm-up of {warmup} steps: "
                                 f"every step would run at the base size; use --steps {warmup + 1} or more")
    return rows


def _variants(name: str, params: dict, sweep: dict) -> list[tuple[str, dict]]:
    """(tag, parameters) per combination of swept values: ``("[tau=0.0005]", {..., "tau": 5e-4})``."""
    for param, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"--sweep {name}.{param}={values!r} is not a list of values; "
                             f"write e.g. --sweep {name}.{param}=[1,2]")
    if not sweep:
        return [("", params)]
    variants = []
    for combo in itertools.product(*sweep.values()):
        tag = ",".join(f"{param}={_compact(value)}" for param, value in zip(sweep, combo))
        variants.append((f"[{tag}]", {**params, **dict(zip(sweep, combo))}))
    return variants


def _compact(value) -> str:
    return repr(value).replace(" ", "").replace("'", "")


def parse_params(items: list[str], flag: str) -> dict[str, dict]:
    """``["third_order.tau=1e-3", "fixed.schedule=[8,8,2]"]`` -> ``{name: {param: value}}``.

    Values are Python literals where they parse as one (numbers, lists, True), else strings.
    """
    params: dict[str, dict] = {}
    for item in items:
        name_param, sep, text = item.partition("=")
        name, dot, param = name_param.partition(".")
        if not (sep and dot and name and param):
            raise ValueError(f"{flag} {item!r} is not NAME.PARAM=VALUE, e.g. {flag} third_order.tau=1e-3")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        params.setdefault(name, {})[param] = value
    return params


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Where two JSON configurations differ, as ``dotted.key: old -> new`` lines."""
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {_show(a)} -> {_show(b)}")
    return lines


_ABSENT = object()


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


class ConfigMismatch(ValueError):
    """An output folder holds results of another configuration."""


def check_folder(out: Path, config: AblationConfig) -> None:
    """Write ``config.json`` into a new folder, or refuse one that holds another configuration.

    One difference is allowed: more samples per class. Sample i's seed and label do not depend
    on the count, so the finished samples are the first ones of the larger run, which goes on
    from them (to narrow the intervals without sampling twice)."""
    path = Path(out) / "config.json"
    new = config.to_json()
    if path.exists():
        old = json.loads(path.read_text())
        had, wants = old.get("num_per_class"), new.get("num_per_class")  # None for pipeline runs
        diff = differences({**old, "num_per_class": None}, {**new, "num_per_class": None})
        if diff or (had is None) != (wants is None):
            raise ConfigMismatch(f"{out} holds results of another configuration ({'; '.join(diff)}); "
                                 "use another --out, or delete the folder to start over")
        if wants is not None and wants < had:
            raise ConfigMismatch(f"{out} holds {had} samples per class and row; --num-per-class may grow, "
                                 "not shrink: use another --out")
        if wants == had:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(new, indent=1))


def effective_params(obj) -> dict:
    """What a policy or cache runs with, defaults included: its constructor's parameters, read back
    from the attributes of the same name (those it keeps)."""
    if obj is None:
        return {}
    names = [n for n in inspect.signature(type(obj).__init__).parameters if n != "self"]
    return {n: getattr(obj, n) for n in names if hasattr(obj, n)}


def _check_settings(policies: list[str], caches: list[str], *, num_per_class: int = 1, batch_size: int = 1,
                    guidance: float = 1.0, **_) -> None:
    """Counts, sizes and guidance that no run can use, refused before anything is written."""
    if num_per_class < 1:
        raise ValueError(f"--num-per-class must be at least 1 (samples per class and row), got {num_per_class}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if not guidance >= 1:
        raise ValueError(f"--guidance must be at least 1 (1: no classifier-free guidance; the testbed's "
                         f"default is 2), got {guidance}")


def _check_names(what: str, names: list[str], known: dict) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; available: {', '.join(known)}")


def _check_params(flag: str, params: dict, selected: list[str]) -> None:
    stray = [name for name in params if name not in selected]
    if stray:
        raise ValueError(f"{flag} names {', '.join(map(repr, stray))}, which this run does not use; "
                         f"it runs: {', '.join(selected) or 'none with parameters'}")

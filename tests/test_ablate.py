"""ddit-ablate on a tiny random DiT with a fresh adapter: files, known answers, resuming, refusals."""

import functools
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIT
from safetensors.torch import load_file

import ddit.ablate.runner as runner
from ddit.ablate.cli import main
from ddit.ablate.config import build_config, parse_params
from ddit.policies import get_policy
from ddit.adapter import MultiPatchTransformer
from ddit.testbed.base_model import build_base_model

ROWS = ["baseline", "baseline@2", "progressive[switch=0.4]", "baseline+teacache", "fixed", "fixed+teacache",
        "third_order", "third_order+teacache"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    backbone = build_base_model(**TINY_DIT)
    for p in backbone.parameters():  # the adaLN-zero init would make every output zero
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    backbone.save_pretrained(folder / "backbone")
    MultiPatchTransformer(backbone).save_pretrained(folder / "adapter")
    return ["--backbone", str(folder / "backbone"), "--adapter", str(folder / "adapter")]


def cli_args(model_dirs, out, *extra):
    """A run of 4 samples (one per class) in batches of 2, 4 steps, a 2-step baseline, and the
    coarsest fixed schedule (patch 8 at every step) beside the paper's policy, each with and
    without a cache (TeaCache with the identity as its fit: the testbed's fit is not for this model; and at
    delta 0.1, which skips steps in 4, where the default 0.025 need not)."""
    return [*model_dirs, "--out", str(out), "--policies", "fixed,third_order", "--caches", "none,teacache",
            "--policy-param", "fixed.fraction=1", "--cache-param", "teacache.coefficients=[1,0]",
            "--cache-param", "teacache.delta=0.1",
            "--num-per-class", "1", "--steps", "4",
            "--fewer-steps", "2", "--batch-size", "2", "--no-progress", *extra]


@pytest.fixture
def args(model_dirs):
    return functools.partial(cli_args, model_dirs)


@pytest.fixture
def calls(monkeypatch):
    """Counts the sampler's calls; ``calls.stop_at`` interrupts the run at that call, as Ctrl-C would."""
    class Calls:
        count, stop_at = 0, None

    generate = runner.generate

    def counted(*a, **kw):
        Calls.count += 1
        if Calls.count == Calls.stop_at:
            raise KeyboardInterrupt
        return generate(*a, **kw)

    monkeypatch.setattr(runner, "generate", counted)
    return Calls


@pytest.fixture(scope="module")
def finished(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "run"
    make = functools.partial(cli_args, model_dirs)
    assert main(make(out)) == 0
    return out, make


def _without_timings(out):
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for line in lines:
        del line["sec"], line["model_sec"], line["trace"]["seconds"], line["written"]
    return sorted(lines, key=lambda r: (r["row"], r["sample"]))


def test_a_run_writes_results_images_summary_and_figures(finished):
    out, _ = finished
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({r["row"] for r in records}) == sorted(ROWS) and len(records) == 4 * len(ROWS)
    assert {r["sample"]: (r["label"], r["seed"]) for r in records if r["row"] == "fixed"} == {
        i: (i, i) for i in range(4)}  # sample i: class i % 4, seed 0 + i, in every row
    assert load_file(out / "images" / "fixed" / "0000002.safetensors")["images"].shape == (2, 3, 32, 32)
    for name in ("config.json", "summary.csv", "report.md", "plots/patch_sizes.png", "plots/signals.png",
                 "plots/pareto.png", "grids/fixed+teacache.png"):
        assert (out / name).is_file(), name
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert list(summary) == ROWS
    base, fixed = summary["baseline"], summary["fixed"]
    assert base["speedup_wall"] == 1 and base["speedup_flops"] == 1
    assert base["ssim_vs_baseline"] == pytest.approx(1) and base["feature_dist_vs_baseline"] == 0
    assert base["psnr_vs_baseline"] is None  # infinite: identical images
    assert (base["mean_patch_size"], base["coarse_step_fraction"]) == (2, 0)
    assert (fixed["mean_patch_size"], fixed["coarse_step_fraction"]) == (8, 1)
    assert fixed["speedup_flops"] > 1 and fixed["per_class"]["stripes"]["speedup_flops"] > 1
    assert fixed["ssim_vs_baseline"] < 1  # and its parameters, defaults included:
    assert fixed["params"] == {"policy": {"schedule": None, "fraction": 1, "size": None}, "cache": {}}
    assert summary["third_order"]["params"]["policy"] == {"tau": 8e-4, "rho": 90.0, "warmup": 3, "restart": True,
                                                           "fine_tail": 0.0}
    assert summary["baseline@2"]["speedup_flops"] == pytest.approx(2, rel=0.01)
    assert base["cached_step_fraction"] == 0 < summary["baseline+teacache"]["cached_step_fraction"]
    assert set(fixed["per_class"]) == {"glow", "moon", "shapes", "stripes"}
    assert "| fixed+teacache |" in (out / "report.md").read_text()


def test_rerun_skips_every_finished_sample(finished, calls):
    out, make = finished
    before = (out / "results.jsonl").read_bytes()
    assert main(make(out)) == 0
    assert calls.count == 0 and (out / "results.jsonl").read_bytes() == before


def test_interrupted_run_resumes_to_the_results_of_an_uninterrupted_one(finished, calls, tmp_path, capsys):
    done, make = finished
    calls.stop_at = 3  # Ctrl-C during the second batch (the first call warms up)
    assert main(make(tmp_path)) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"row": "baseline", "sam')  # a line torn by a kill
    calls.count, calls.stop_at = 0, None
    assert main(make(tmp_path)) == 0
    assert calls.count == 1 + 2 * len(ROWS) - 1  # a warm-up, then all but the first batch
    assert _without_timings(tmp_path) == _without_timings(done)
    for row in ROWS:
        assert torch.equal(runner.load_images(tmp_path, row), runner.load_images(done, row))


def test_more_samples_per_class_go_on_from_the_finished_ones(finished, calls, tmp_path, capsys):
    """Growing --num-per-class keeps every finished sample (sample i's seed and label do not depend on the
    count): the grown run equals one sampled at that size from the start. Shrinking is refused."""
    done, make = finished
    shutil.copytree(done, tmp_path / "grown")
    assert main([*make(tmp_path / "grown"), "--num-per-class", "2"]) == 0
    assert calls.count == 1 + 2 * len(ROWS)  # a warm-up, then only the new batches
    assert main([*make(tmp_path / "fresh"), "--num-per-class", "2"]) == 0
    assert _without_timings(tmp_path / "grown") == _without_timings(tmp_path / "fresh")
    assert main(make(tmp_path / "grown")) == 2
    assert "may grow, not shrink" in capsys.readouterr().err


def test_another_configuration_in_the_same_folder_is_refused(finished, capsys):
    out, make = finished
    assert main([*make(out), "--seed", "1", "--cache-param", "teacache.delta=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds results of another configuration" in err and "seed: 0 -> 1" in err
    assert "rows.baseline+teacache.cache_params.delta: 0.1 -> 0.5" in err


@pytest.mark.parametrize("flag, value, expected", [
    ("--policies", "thrid_order", "unknown patch policy 'thrid_order'; available: baseline, budget,"),
    ("--caches", "none,teacach", "unknown cache 'teacach'; available: none, "),
    ("--policy-param", "fixed.fractoin=1", "bad parameters for policy 'fixed'"),
    ("--policy-param", "mean.tau=1", "--policy-param names 'mean', which this run does not use"),
    ("--cache-param", "delta=0.4", "is not NAME.PARAM=VALUE"),
    ("--sweep", "third_order.tau=1e-3", "--sweep third_order.tau=0.001 is not a list of values"),
    ("--sweep", "mean.tau=[1e-3]", "--sweep names 'mean', which this run does not use"),
    ("--device", "gpu0", "--device 'gpu0' is not a device name"),
    ("--num-per-class", "0", "--num-per-class must be at least 1"),
    ("--num-per-class", "-2", "--num-per-class must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--batch-size", "-3", "--batch-size must be at least 1"),
    ("--guidance", "-5", "--guidance must be at least 1"),
    ("--steps", "2", "--steps 2 is not more than third_order's warm-up of 3 steps"),
    ("--caches", "", "--caches is empty"),
    ("--height", "64", "--height needs --pipeline"),
    ("--num-per-prompt", "2", "--num-per-prompt needs --pipeline"),
    *([("--device", "cuda", "no CUDA GPU")] if not torch.cuda.is_available() else []),
])
def test_bad_names_and_parameters_say_what_is_known(args, tmp_path, capsys, flag, value, expected):
    assert main([*args(tmp_path / "run"), flag, value]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_adapter_says_how_to_make_one(args, tmp_path, capsys):
    assert main([*args(tmp_path / "run"), "--adapter", str(tmp_path / "nothing")]) == 2
    assert "ddit distill" in capsys.readouterr().err


def test_parameters_are_python_literals_or_strings():
    assert parse_params(["fixed.schedule=[8, 8, 2]", "third_order.tau=1e-3", "x.mode=fast", "third_order.rho=95"],
                        "--policy-param") == {"fixed": {"schedule": [8, 8, 2]}, "third_order": {"tau": 1e-3, "rho": 95},
                                              "x": {"mode": "fast"}}


def test_sweeps_make_one_row_per_value_and_combination():
    config = build_config(["third_order"], ["none", "teacache"], fewer_steps=(),
                          policy_params={"third_order": {"rho": 80}},
                          sweeps={"third_order": {"tau": [3e-4, {4: 6e-4, 8: 2e-4}]}, "teacache": {"delta": [0.1, 0.2]}})
    rows = config.rows
    assert list(rows) == [
        "baseline", "baseline+teacache[delta=0.1]", "baseline+teacache[delta=0.2]",
        "third_order[tau=0.0003]", "third_order[tau=0.0003]+teacache[delta=0.1]",
        "third_order[tau=0.0003]+teacache[delta=0.2]", "third_order[tau={4:0.0006,8:0.0002}]",
        "third_order[tau={4:0.0006,8:0.0002}]+teacache[delta=0.1]",
        "third_order[tau={4:0.0006,8:0.0002}]+teacache[delta=0.2]"]
    row = rows["third_order[tau={4:0.0006,8:0.0002}]+teacache[delta=0.2]"]
    assert row.policy_params == {"rho": 80, "tau": {4: 6e-4, 8: 2e-4}} and row.cache_params == {"delta": 0.2}
    assert row.make_policy().threshold(8) == 2e-4 and row.make_cache().delta == 0.2


def test_budget_rows_are_calibrated_once_and_sample_with_that_tau(model_dirs, tmp_path, calls):
    command = [*model_dirs, "--out", str(tmp_path), "--policies", "budget", "--policy-param", "budget.fraction=0.8",
               "--num-per-class", "1", "--steps", "6", "--fewer-steps", "", "--batch-size", "2", "--no-progress"]
    assert main(command) == 0
    tau = json.loads((tmp_path / "calibration.json").read_text())["budget"]
    assert tau > 0
    summary = {r["row"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert {"fraction": 0.8, "calibrated_tau": tau}.items() <= summary["budget"]["params"]["policy"].items()
    for record in runner.read_results(tmp_path):
        if record["row"] == "budget":  # every step is the third-order rule at the calibrated tau
            trace, rule = record["trace"], get_policy("third_order", tau=tau)
            rule.reset(1, 2, (2, 4, 8))
            for step, size in enumerate(trace["patch_size"]):
                signals = [trace["signals"][p][step] for p in ("2", "4", "8")]
                assert size == int(rule.schedule(None if signals[0] is None else torch.tensor(signals)[:, None]))
    calls.count = 0
    assert main(command) == 0 and calls.count == 0  # resumed: no recalibration, no sampling


def test_the_oracle_at_the_policys_cost_shows_available_vs_captured(model_dirs, tmp_path):
    """``oracle_budget`` is fitted to a token cost; the report pairs it with the policy and puts
    their per-class schedules side by side, from the records."""
    command = [*model_dirs, "--out", str(tmp_path), "--policies", "third_order,oracle_budget",
               "--policy-param", "third_order.tau=1e9", "--policy-param", "oracle_budget.speedup=2",
               "--num-per-class", "1", "--steps", "6", "--fewer-steps", "", "--batch-size", "4", "--no-progress"]
    assert main(command) == 0
    tolerance = json.loads((tmp_path / "calibration.json").read_text())["oracle_budget"]
    [pair] = json.loads((tmp_path / "adaptivity.json").read_text())
    assert (pair["oracle"], pair["policy"]) == ("oracle_budget", "third_order")
    records = {r["row"]: r for r in runner.read_results(tmp_path) if r["sample"] == 0}
    for row in ("oracle_budget", "third_order"):  # sample 0 is the only one of its class
        sizes = records[row]["trace"]["patch_size"]
        prompt = ["glow", "moon", "shapes", "stripes"][records[row]["label"]]
        assert pair["per_class"][row][prompt]["mean_patch_size"] == pytest.approx(sum(sizes) / len(sizes))
        assert pair["coarse_per_step"][row][prompt] == [float(p > 2) for p in sizes]
    # the oracle's sizes are its errors against the fitted tolerance (Eq. 5 on them)
    trace = records["oracle_budget"]["trace"]
    for step, size in enumerate(trace["patch_size"]):
        below = [int(p) for p in ("2", "4", "8") if trace["signals"][p][step] < tolerance]
        assert size == max(below, default=2)
    report = (tmp_path / "report.md").read_text()
    assert "## Available vs captured" in report and "plots/adaptivity.png" in report
    assert (tmp_path / "plots" / "adaptivity.png").stat().st_size > 0


def test_a_run_with_nothing_to_compare_is_refused(model_dirs, tmp_path, capsys):
    alone = ["--policies", "baseline", "--caches", "none", "--fewer-steps", "", "--progressive", ""]
    assert main([*model_dirs, "--out", str(tmp_path / "run"), *alone]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # the training-free references alone are a comparison
    assert list(build_config([], ["none"], fewer_steps=(15,), progressive=(0.4,)).rows) == [
        "baseline", "baseline@15", "progressive[switch=0.4]"]


def _summary_without_timings(out):
    keep = ("sec_per_image", "speedup_wall", "speedup_wall_range", "batch_seconds_spread")
    return [{k: v for k, v in r.items() if k not in keep} for r in json.loads((out / "summary.json").read_text())]


def test_torn_records_duplicates_and_damaged_images_resume_to_the_uninterrupted_result(finished, tmp_path, capsys):
    done, make = finished
    shutil.copytree(done, tmp_path / "run")
    out = tmp_path / "run"
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    torn = lines[:5] + [lines[5][: len(lines[5]) // 2]]  # a kill in the middle of a batch's second record
    (out / "results.jsonl").write_text("".join(torn + lines[:2]))  # ...after which two records came twice
    victim = out / "images" / "baseline" / "0000000.safetensors"  # its records are intact
    victim.write_bytes(victim.read_bytes()[:100])  # and an image file cut short
    (out / "summary.json").unlink()
    assert main(make(out)) == 0
    err = capsys.readouterr().err
    assert "unreadable line" in err and "repeated record" in err and "missing or damaged" in err
    assert _summary_without_timings(out) == _summary_without_timings(done)
    assert main(make(out)) == 0  # and it stays finished
    assert "not finished" not in capsys.readouterr().err


def test_rows_run_interleaved_batch_by_batch_and_report_their_spread(finished):
    out, _ = finished
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["row"], r["sample"]) for r in records[:4]] == [(ROWS[0], 0), (ROWS[0], 1), (ROWS[1], 0), (ROWS[1], 1)]
    summary = json.loads((out / "summary.json").read_text())
    low, high = summary[1]["speedup_wall_range"]  # two batches per row: a range
    assert low <= high and summary[0]["speedup_wall_range"] == [1, 1]


def test_the_report_flags_wall_times_it_cannot_vouch_for():
    from ddit.ablate.report import _timing_warnings

    summary = [{"row": "baseline", "speedup_wall": 1.0, "speedup_flops": 1.0, "batch_seconds_spread": 0.5},
               {"row": "fast", "speedup_wall": 2.0, "speedup_flops": 2.1, "batch_seconds_spread": 0.1},
               {"row": "odd", "speedup_wall": 0.9, "speedup_flops": 4.3, "batch_seconds_spread": 0.1}]
    text = _timing_warnings(summary)
    assert "machine was busy" in text and "`odd` is 0.90x in wall time but 4.30x in FLOPs" in text
    assert "`fast`" not in text
    summary[0]["batch_seconds_spread"] = 0.05
    assert "busy" not in _timing_warnings(summary)


def test_the_python_api_runs_script_policies_and_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import re

    from ddit.policies import available_policies

    monkeypatch.chdir(tmp_path)
    docs = (Path(__file__).parents[1] / "docs" / "ablation.md").read_text()
    block = re.findall(r"```python\n(.*?)```", docs[docs.index("## From Python"):], flags=re.S)[0]
    namespace = {}
    exec(block, namespace)
    rows = {r["row"]: r for r in namespace["summary"]}
    assert set(rows) == {"baseline", "baseline@3", "every_other_step", "third_order"}
    assert rows["every_other_step"]["coarse_step_fraction"] == 0.5  # 3 of its 6 steps at patch 4
    assert rows["third_order"]["params"]["policy"]["tau"] == 8e-4  # defaults, read back
    assert "every_other_step" not in available_policies()  # registered for the run only
    assert "every_other_step" in capsys.readouterr().out


def test_killed_at_random_points_and_torn_it_still_ends_as_an_uninterrupted_run(finished, tmp_path):
    """SIGKILL at random moments while sampling (after a random number of records), and after some kills a
    results file or an image file cut to a random prefix (a torn write), then a run to the end: the summary of an
    uninterrupted run."""
    done, make = finished
    out = tmp_path / "run"
    rng = random.Random(0)
    command = [sys.executable, "-m", "ddit.ablate.cli", *make(out)]
    results, total = out / "results.jsonl", 4 * len(ROWS)
    killed_mid_run = 0
    for _ in range(4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for = rng.randrange(1, total)  # records, counted over the runs so far
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline and (
                not results.exists() or results.read_text().count("\n") < wait_for):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the batch after
        killed_mid_run += process.poll() is None and not (out / "summary.json").exists()
        process.send_signal(signal.SIGKILL)
        process.wait()
        files = [out / "results.jsonl", *sorted((out / "images").rglob("*.safetensors"))] if out.exists() else []
        files = [f for f in files if f.exists()]
        if files and rng.random() < 0.7:
            victim = rng.choice(files)
            data = victim.read_bytes()
            victim.write_bytes(data[: rng.randrange(len(data) + 1)])
    assert killed_mid_run >= 2  # the kills did fall while sampling
    assert main(make(out)) == 0
    assert _summary_without_timings(out) == _summary_without_timings(done)


def test_a_rows_psnr_is_that_of_its_mean_squared_error_so_one_identical_sample_does_not_make_it_infinite():
    from ddit.ablate.tables import row_mean

    assert row_mean("psnr_vs_baseline", torch.tensor([float("inf"), 20.0])) == pytest.approx(10 * math.log10(200))
    assert row_mean("psnr_vs_baseline", torch.tensor([float("inf")] * 2)) == math.inf  # every sample: identical
    assert row_mean("ssim_vs_baseline", torch.tensor([1.0, 0.5])) == 0.75


def test_of_a_samples_records_in_several_processes_files_the_last_written_is_kept(tmp_path):
    old = {"row": "fixed", "sample": 0, "sec": 9.0, "written": 100.0}  # a killed 2-process run's rank 1
    new = {"row": "fixed", "sample": 0, "sec": 1.0, "written": 200.0}  # the batch sampled again by one process
    (tmp_path / "results.jsonl").write_text(json.dumps(new) + "\n")
    (tmp_path / "results-rank1.jsonl").write_text(json.dumps(old) + "\n")
    assert runner.read_results(tmp_path) == [new]


def test_flops_counted_ahead_leave_none_to_count_in_a_timed_run(model_dirs, monkeypatch):
    import ddit.sampling
    from ddit.ablate.models import folders, load_model
    from ddit.caches import get_cache
    from ddit.sampling import count_flops_ahead, transformer_velocity
    from ddit.testbed.base_model import generate

    model = load_model(folders(model_dirs[1], model_dirs[3]))
    for shape in ((3, 32, 32), (3, 16, 16)):
        count_flops_ahead(transformer_velocity(model), shape, guidance=2.0)
    monkeypatch.setattr(ddit.sampling, "count_flops", lambda *a, **kw: pytest.fail("counted in a timed run"))
    for policy, cache in ((get_policy("fixed", fraction=0.5), get_cache("teacache", coefficients=[1, 0], delta=0.1)),
                          (get_policy("progressive"), None)):
        traces = generate(model, torch.arange(2), steps=4, policy=policy, cache=cache).traces
        assert all(step["flops"] > 0 for trace in traces for step in trace)


def test_the_python_api_refuses_to_resume_with_another_model(model_dirs, tmp_path):
    import ddit.ablate
    from ddit.ablate.models import folders, load_model

    model = load_model(folders(model_dirs[1], model_dirs[3]))
    settings = dict(policies=["fixed"], caches=["none"], steps=2, fewer_steps=(), num_per_class=1, batch_size=4,
                    policy_params={"fixed": {"fraction": 1}}, progress=False)
    ddit.ablate.run(tmp_path, model=model, **settings)
    with torch.no_grad():
        model.heads["4"].embed.weight.add_(0.1)  # other weights
    with pytest.raises(ValueError, match="another configuration"):
        ddit.ablate.run(tmp_path, model=model, **settings)


def test_an_explicit_progressive_row_stays_beside_the_progressive_policy(args, tmp_path, monkeypatch):
    import ddit.ablate.runner

    def stop(config, *a, **kw):
        raise RuntimeError(f"rows: {sorted(config.rows)}")

    monkeypatch.setattr(ddit.ablate.runner, "run_ablation", stop)
    with pytest.raises(RuntimeError, match=r"progressive\[switch=0.3\]"):
        from ddit.ablate.cli import build_parser, run
        run(build_parser().parse_args([*args(tmp_path / "run"), "--policies", "progressive,fixed",
                                       "--progressive", "0.3"]), None)


def test_a_teacache_fit_file_is_read_into_the_rows(tmp_path):
    """The rows (a run's identity) hold a fit file's numbers, not its path: a resumed run on a re-fitted file is
    told apart; a published fit's name becomes its numbers too, and a missing file is refused up front."""
    from ddit.ablate.config import build_rows
    from ddit.caches import PUBLISHED_FITS, write_teacache_fit

    write_teacache_fit([0, 0, 0, 2, 0], tmp_path / "fit.json")
    published = PUBLISHED_FITS["flux1-dev"]
    for given, params in ((str(tmp_path / "fit.json"), {"coefficients": [0, 0, 0, 2, 0]}), ("flux1-dev", published)):
        rows = build_rows(["mean"], ["teacache"], cache_params={"teacache": {"coefficients": given}}, fewer_steps=())
        assert rows["mean+teacache"].cache_params == params
    with pytest.raises(ValueError, match="neither a published fit"):
        build_rows(["mean"], ["teacache"], cache_params={"teacache": {"coefficients": "nope.json"}})

"""Smoke tests of the benchmark scripts: each runs a tiny configuration in seconds and writes a
well-formed CSV. Not timed tests: no number is checked against a target here."""
import csv
import importlib.util
import json
import os
import sys

import pytest
import torch

from benchmarks import bench_e2e, bench_sample, bench_verify, harness as H


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    for col in H.COLUMNS + H.ENV_COLUMNS:
        assert col in header, f"missing column {col} in {path}"
    assert rows, f"{path} has no rows"
    for r in rows:
        assert r["op"] and r["provider"] and r["device"] and r["torch"] and r["git_commit"]
        if r["median_ms"]:
            assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
            assert int(r["runs"]) >= 1
    return rows


def test_harness_bench_and_csv(tmp_path):
    x = torch.ones(1000)
    calls = []
    t = H.bench(lambda: calls.append(x.sum()), runs=7, warmup=2, warmup_s=0.0)
    assert t.runs == 7 and 0 <= t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(calls) >= 9
    env = H.env_info("cpu")
    path = tmp_path / "x.csv"
    with H.CsvWriter(path, env, extra_columns=["mode"]) as w:
        w.add(op="op", provider="p", shape=H.shape_str(B=1, V=8), dtype="fp32", timing=t, bytes=4000,
              copy_gb_per_s=10.0, mode="m")
        with pytest.raises(KeyError):
            w.add(op="op", provider="p", bogus=1)
    rows = _rows(path)
    assert rows[0]["shape"] == "B=1 V=8" and rows[0]["mode"] == "m"
    assert float(rows[0]["gb_per_s"]) > 0 and float(rows[0]["frac_of_copy"]) > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_copy_bandwidth_positive():
    assert H.copy_bandwidth("cpu", nbytes=8 << 20, runs=3) > 0


def test_bench_verify_smoke(tmp_path):
    rc = bench_verify.main(["--quick", "--out", str(tmp_path), "--B", "1,2", "--V", "1000", "--runs", "3",
                            "--max-time", "0.2", "--modes", "sampled,greedy", "--no-plot"])
    assert rc == 0
    rows = _rows(tmp_path / "verify_cpu_quick.csv")
    provs = {r["provider"] for r in rows}
    assert {"reference", "torch_fp32", "hf"} <= provs
    assert all(r["op"] == "verify" and float(r["gb_per_s"]) > 0 for r in rows if r["median_ms"])


def test_bench_verify_masked_rows(tmp_path):
    """The *_masked providers run with a token bitmask and report their time over the plain op's."""
    from specdec import reference

    if not bench_verify.provider_status("cpp", torch.device("cpu"))[0]:
        pytest.skip("the C++ backend did not load")
    rc = bench_verify.main(["--quick", "--out", str(tmp_path), "--B", "2", "--V", "1000", "--runs", "3",
                            "--max-time", "0.2", "--modes", "sampled", "--no-plot",
                            "--providers", "cpp,cpp_premasked,cpp_masked,cpp_masked_fill"])
    assert rc == 0
    rows = {r["provider"]: r for r in _rows(tmp_path / "verify_cpu_quick.csv")}
    assert float(rows["cpp_masked"]["vs_without_mask"]) > 0 and not rows["cpp"]["vs_without_mask"]
    assert float(rows["cpp_masked_fill"]["median_ms"]) > 0
    logits = torch.randn(2, 4, 1000)
    drafts = torch.randint(0, 1000, (2, 3))
    probs = torch.softmax(torch.randn(2, 3, 1000), -1)
    mask = bench_verify.make_bitmask(logits, drafts)
    allowed = reference.allowed_ids(mask, 1000)
    calls = {n: bench_verify.make_call(n, logits, drafts, None, probs, 1.0, mask)[0]
             for n in ("cpp_premasked", "cpp_masked", "cpp_masked_fill")}
    outs = [calls[n]() for n in calls]  # the same tokens: the variants differ only in where the mask goes
    assert all(torch.equal(o[0], outs[0][0]) for o in outs)
    assert 0.4 < allowed.float().mean() < 0.6  # about half allowed, the drafts and argmaxes always
    assert bool(allowed[:, :3].gather(2, drafts[..., None]).all() and allowed.gather(2, logits.argmax(-1)[..., None]).all())


def test_bench_verify_plot(tmp_path):
    pytest.importorskip("matplotlib")
    bench_verify.main(["--quick", "--out", str(tmp_path), "--B", "1", "--V", "500", "--runs", "3",
                       "--providers", "torch_fp32,reference"])
    assert list(tmp_path.glob("verify_cpu_quick_*.png"))


def test_bench_verify_torch_fp32_greedy_matches_reference():
    logits = torch.randn(3, 5, 50)
    drafts = logits[:, :4].argmax(-1)
    drafts[1, 2] = (drafts[1, 2] + 1) % 50
    out, n = bench_verify.torch_fp32_verify(logits, drafts, None, 0.0)
    ref_out, ref_n = bench_verify.make_call("reference", logits, drafts, None, None, 0.0)[0]()
    assert torch.equal(n.int(), ref_n.int()) and torch.equal(out, ref_out)


def test_unavailable_explicit_provider_exits_nonzero(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(SystemExit) as exc:
        bench_verify.main(["--quick", "--out", str(tmp_path), "--providers", "triton"])
    assert exc.value.code != 0


def test_select_providers(capsys):
    status = {"a": (True, ""), "b": (False, "no GPU")}.get
    assert H.select_providers(None, ["a", "b"], ["a", "b"], status) == ["a"]  # default: b skipped
    assert "skipping provider b: no GPU" in capsys.readouterr().err
    assert H.select_providers("a", ["b"], ["a", "b"], status) == ["a"]
    for requested in ("b", "a,zzz"):  # asked for but unavailable; unknown name
        with pytest.raises(SystemExit) as exc:
            H.select_providers(requested, ["a"], ["a", "b"], status)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):  # nothing can run
        H.select_providers(None, ["b"], ["a", "b"], status)


def test_bench_sample_smoke(tmp_path):
    rc = bench_sample.main(["--quick", "--out", str(tmp_path), "--B", "1,2", "--V", "1000", "--runs", "3",
                            "--max-time", "0.2", "--modes", "plain,top_p,greedy", "--no-plot"])
    assert rc == 0
    rows = _rows(tmp_path / "sample_cpu_quick.csv")
    assert {"reference", "torch_fp32"} <= {r["provider"] for r in rows}


def test_bench_e2e_smoke(tmp_path):
    providers = ["hf", "hf-prompt-lookup"]
    if importlib.util.find_spec("specdec.generator") and importlib.util.find_spec("specdec.cache"):
        providers.append("specdec-ngram")
    rc = bench_e2e.main(["--quick", "--out", str(tmp_path), "--providers", ",".join(providers),
                         "--modes", "greedy", "--prompts", "1", "--max-new-tokens", "8", "--no-plot"])
    assert rc == 0
    rows = _rows(tmp_path / "e2e_cpu_quick.csv")
    e2e = [r for r in rows if r["op"] == "e2e"]
    assert {r["provider"] for r in e2e} >= {"hf", "hf-prompt-lookup"}
    for r in e2e:
        assert "failed" not in r["note"], r["note"]
        assert float(r["tokens_per_s"]) > 0
    assert any(r["op"] == "target_forward" and float(r["cost_ratio"]) > 0 for r in rows)


def test_gpu_check_dry_run(tmp_path):
    """The GPU validation script's CPU dry run (tiny shapes, Triton interpreter), so it cannot rot
    between GPU leases: Triton tokens equal the reference's and the chi-square part runs."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    assert {r["part"] for r in rows} == {"correct", "chi2"}
    assert all(r["ok"] == "True" for r in rows), rows


def test_bench_verify_tree_smoke_and_baseline(tmp_path):
    """The tree benchmark runs, and its eager PyTorch baseline verifies greedy trees exactly like
    the op (the same accepted paths and emitted tokens)."""
    from benchmarks import bench_verify_tree as T
    from specdec import ops

    rc = T.main(["--quick", "--out", str(tmp_path), "--B", "1,2", "--N", "8", "--V", "1000", "--runs", "3",
                 "--max-time", "0.05", "--no-plot", "--modes", "sampled,ngram,greedy"])
    assert rc == 0
    rows = _rows(tmp_path / "verify_tree_cpu_quick.csv")
    assert {r["provider"] for r in rows} >= {"reference", "torch_fp32", "cpp", "cpp_chain"}
    assert all(float(r["median_ms"]) > 0 for r in rows if r["median_ms"])
    for B, N in ((3, 8), (2, 16)):
        logits, tokens, parents, _ = T.make_inputs(B, N, 500, torch.float32, torch.device("cpu"), "greedy", seed=B)
        out, n = T.torch_fp32_verify_tree(logits, tokens, parents, None, 0.0)
        ref_out, ref_n, _ = ops.verify_tree(logits, tokens, parents, None, temperature=0.0, backend="reference")
        assert torch.equal(n.long(), ref_n.long()) and n.max() > 0
        assert torch.equal(out[:, : ref_out.shape[1]], ref_out)


def test_bench_linear_smoke(tmp_path):
    from specdec.linear import narrow_linear_available

    if not narrow_linear_available():
        pytest.skip("specdec._C not built")
    from benchmarks import bench_linear

    rc = bench_linear.main(["--quick", "--out", str(tmp_path), "--no-plot", "--rows", "1,3"])
    assert rc == 0
    rows = _rows(tmp_path / "narrow_linear_cpu_quick.csv")
    assert {(r["provider"], r["shape"]) for r in rows} == {(p, f"M={m}") for p in ("specdec", "torch") for m in (1, 3)}
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_progress_bars_only_on_a_terminal(capsys, monkeypatch):
    import io

    pytest.importorskip("tqdm")
    monkeypatch.delenv("SPECDEC_BENCH_NO_PROGRESS", raising=False)
    assert list(H.progress(range(3), desc="piped")) == [0, 1, 2]  # stderr is captured: not a terminal
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(H.progress(range(3), desc="on a tty")) == [0, 1, 2]
    assert "on a tty" in term.getvalue()
    monkeypatch.setenv("SPECDEC_BENCH_NO_PROGRESS", "1")
    term.seek(0), term.truncate()
    list(H.progress(range(3), desc="off"))
    assert term.getvalue() == ""


def test_bench_e2e_structured_smoke(tmp_path):
    """The structured-output workload at tiny size (a random Llama over SmolLM2's tokenizer, enum and
    boolean schemas it completes in a few tokens): one row per provider, mode and batch, every output
    complete and valid, greedy outputs equal across the four providers (the mask makes them the same
    argmax), and the tokens-per-forward relations that hold by construction."""
    pytest.importorskip("xgrammar")
    pytest.importorskip("jsonschema")
    rc = bench_e2e.main(["--workload", "structured", "--quick", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    rows = _rows(tmp_path / "e2e_structured_cpu_quick.csv")
    for col in ("valid_frac", "complete_frac", "same_as_hf", "outputs", "speedup_vs_hf"):
        assert col in rows[0]
    by = {(r["provider"], r["mode"], r["batch"]): r for r in rows}
    assert len(by) == len(rows) == 16
    assert set(by) == {(p, m, b) for p in bench_e2e.STRUCT_PROVIDERS for m in ("greedy", "sampled") for b in ("1", "2")}
    for (name, mode, batch), r in by.items():
        assert r["op"] == "e2e_structured" and float(r["tokens_per_s"]) > 0, r
        assert int(r["outputs"]) == 2 and int(r["new_tokens"]) > 0
        assert float(r["valid_frac"]) == 1.0 and float(r["complete_frac"]) == 1.0, r
        assert (r["speedup_vs_hf"] == "") == (name == "hf-xgrammar")
        assert (r["same_as_hf"] != "") == (mode == "greedy")
        if mode == "greedy":
            assert float(r["same_as_hf"]) == 1.0, r
            assert r["new_tokens"] == by[("hf-xgrammar", "greedy", "1")]["new_tokens"]
        steps = {p: by[(p, mode, batch)]["tokens_per_step"] for p in bench_e2e.STRUCT_PROVIDERS}
        assert float(steps["specdec-none"]) == 1.0
        assert steps["hf-xgrammar"] == ("1" if batch == "1" else "")  # HF per row only at batch 1
        # keys, quotes and braces are forced: forced drafts beat n-gram drafts alone per forward
        assert float(steps["specdec-ngram-forced"]) > float(steps["specdec-ngram"]) >= 1.0


def test_bench_e2e_structured_tasks():
    """The 8 schemas are valid JSON schemas that xgrammar compiles; json_valid tells valid from invalid."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    from specdec import Grammar
    from specdec.generator.grammar import GrammarCompiler
    from specdec.models import load_tokenizer

    tasks = bench_e2e.structured_tasks(8)
    assert len({text for text, _ in tasks}) == 8
    tok = load_tokenizer(None)
    compiler = GrammarCompiler(tok, len(tok), [tok.eos_token_id])
    for text, schema in tasks:
        jsonschema.Draft202012Validator.check_schema(schema)
        assert json.dumps(schema) in text
        compiler.compile(Grammar.json_schema(schema))
    person = tasks[0][1]
    ok = {"name": "Maria Lopez", "age": 34, "city": "Valencia", "occupation": "architect", "languages": ["Spanish"]}
    assert bench_e2e.json_valid(json.dumps(ok), person)
    assert not bench_e2e.json_valid(json.dumps({**ok, "age": "34"}), person)  # wrong type
    assert not bench_e2e.json_valid(json.dumps({k: v for k, v in ok.items() if k != "city"}), person)  # missing
    assert not bench_e2e.json_valid(json.dumps(ok)[:-1], person)  # cut off before the closing brace
    assert not bench_e2e.json_valid("", person)


def test_bench_e2e_structured_unknown_provider(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_e2e.main(["--workload", "structured", "--quick", "--out", str(tmp_path), "--providers", "hf"])
    assert exc.value.code == 2

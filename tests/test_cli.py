"""The ``specdec`` command line: end to end on the embedded model, and clear errors."""
import json
import os
import subprocess
import sys
import time

import pytest

from specdec.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_end_to_end_on_embedded_default():
    pytest.importorskip("gguf")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "specdec", "generate", "--max-new-tokens", "6", "--json",
         "Repeat this text: one two three four, one two three four."],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 1 and 1 <= len(out["token_ids"][0]) <= 6
    assert out["stats"]["drafter"] == "ngram" and out["stats"]["generated_tokens"] == len(out["token_ids"][0])
    assert "quantization none (auto on cpu" in proc.stderr
    # stderr is a pipe here: a log gets the stats lines, no progress bars (their \r updates)
    assert "\r" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["generate", "--temperature", "-1", "hi"], "--temperature"),
    (["generate", "--top-p", "0", "hi"], "--top-p"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", "--int8", "--no-int8", "hi"], "not allowed with"),
    (["generate"], "give a prompt"),
    (["generate", "--file", "/no/such/prompts.txt"], "cannot read"),
    (["generate", "--bogus-flag", "hi"], "unrecognized arguments"),
    (["bench", "nonsense"], "unknown benchmark"),
    (["generate", "--temperature", "nan", "hi"], "--temperature"),
    (["generate", "--temperature", "inf", "hi"], "--temperature"),
    (["generate", "--device", "foo", "hi"], "--device foo"),
    (["generate", "--device", "meta", "hi"], "--device meta"),
    (["generate", "--json-schema", "not json", "hi"], "--json-schema"),
    (["generate", "--json-schema", "[1, 2]", "hi"], "must be an object"),
    (["generate", "--any-json", "--regex", "a+", "hi"], "not allowed with"),
    (["generate", "--grammar", "/no/such/grammar.ebnf", "hi"], "--grammar /no/such/grammar.ebnf"),
])
def test_bad_flags_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--target", "specdec-test/no-such-model", "-q", "hi"]) == 1
    err = capsys.readouterr().err
    assert "specdec: error:" in err and "specdec-test/no-such-model" in err and "Traceback" not in err


def test_mismatched_tokenizers_are_a_clear_error(tmp_path, capsys):
    from _tiny_models import tiny_model, word_tokenizer

    for name, words in (("target", "w"), ("drafter", "v")):
        tiny_model("llama", seed=0, layers=1).save_pretrained(tmp_path / name)
        word_tokenizer([f"{words}{i}" for i in range(80)]).save_pretrained(tmp_path / name)
    argv = ["generate", "--target", str(tmp_path / "target"), "--drafter", str(tmp_path / "drafter"), "-q", "w1 w2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "different tokenizers" in err and "Traceback" not in err


def test_bench_missing_script(tmp_path, capsys):
    assert main(["bench", "verify", "--benchmarks-dir", str(tmp_path)]) == 1
    assert "bench_verify.py not found" in capsys.readouterr().err


def test_bench_runs_script_with_args(tmp_path, capsys):
    (tmp_path / "bench_cache.py").write_text("def main(argv):\n    print('ran', argv)\n    return 0\n")
    out = tmp_path / "results"
    assert main(["bench", "cache", "--benchmarks-dir", str(tmp_path), "--out", str(out), "--",
                 "--quick", "--n", "3"]) == 0
    assert f"ran ['--quick', '--n', '3', '--out', '{out}']" in capsys.readouterr().out
    assert out.is_dir()


def test_bench_defaults_outside_the_source_tree(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bench_cache.py").write_text("def main(argv):\n    print('ran', argv)\n    return 0\n")
    assert main(["bench", "cache", "--benchmarks-dir", str(tmp_path)]) == 0
    assert f"'--out', '{tmp_path / 'cache' / 'bench'}'" in capsys.readouterr().out


def test_show_acceptance_colours(capsys):
    from specdec.cli import _GREEN, _RED, _Printer
    from specdec.generator import Chunk

    class Tok:  # one character per id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    printer = _Printer(Tok(), colour=True)
    printer(Chunk(0, [0, 1, 2], num_accepted=2, num_drafted=4, finished=False))  # 2 accepted, then a resample
    printer(Chunk(0, [3], num_accepted=0, num_drafted=0, finished=True))  # no draft: plain target token
    out = capsys.readouterr().out
    assert out == f"{_GREEN}ab\033[0m{_RED}c\033[0md"


def test_non_utf8_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--file", str(bad)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not UTF-8" in err and "Traceback" not in err


def test_runtime_value_errors_are_one_line(tmp_path, capsys):
    """Errors found after parsing (here: more new tokens than the model has positions) print one
    line and exit 2, not a traceback."""
    from _tiny_models import tiny_model, word_tokenizer

    tiny_model("llama", seed=0, layers=1).save_pretrained(tmp_path / "m")
    word_tokenizer([f"w{i}" for i in range(80)]).save_pretrained(tmp_path / "m")
    argv = ["generate", "--target", str(tmp_path / "m"), "-q", "--raw", "-n", "3000000", "w1 w2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens=3000000" in err and "Traceback" not in err


def test_subcommand_errors_show_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--top-p", "0", "hi"])
    assert "usage: specdec generate" in capsys.readouterr().err


def test_missing_paths_fail_before_loading(capsys, monkeypatch):
    """A path-like --target or --drafter that does not exist is refused before any model loads."""
    import specdec.models as models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the names were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    assert main(["generate", "--drafter", "./no/such/drafter", "-q", "hi"]) == 1
    assert "drafter './no/such/drafter': no such directory" in capsys.readouterr().err
    assert main(["generate", "--target", "/no/such/target", "-q", "hi"]) == 1
    assert "target '/no/such/target': no such directory" in capsys.readouterr().err


# -- hub ids: the local cache first, a clear error in seconds when the hub cannot be reached -------------

def test_unknown_hub_id_fails_fast_offline(tmp_path):
    """With the hub off and an empty cache, a hub id fails in seconds (it used to spend 30-84 s in
    the hub client's retries) with one line, before any model loads."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    env.pop("HF_HUB_CACHE", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "specdec", "generate", "--target", "org/doesnotexist", "x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    assert ("target 'org/doesnotexist' is not a local path, is not in the local Hugging Face cache and the hub "
            "is unreachable (offline") in proc.stderr
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert elapsed < 10, f"{elapsed:.1f} s"  # the interpreter and torch import take most of it


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    import specdec.models as models

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(models, "_HUB_CHECKED", {})
    calls = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: calls.append(("model", a)))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: calls.append(("tokenizer", a)))
    return tmp_path, calls


def test_hub_names_are_checked_before_any_load(empty_hub, monkeypatch, capsys):
    """--drafter bogus/name fails before the target loads; an unreachable endpoint (not only
    HF_HUB_OFFLINE) fails fast too; a hub id in the local cache passes the check."""
    import specdec.models as models

    hub, calls = empty_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--drafter", "org/nope", "-q", "hi"]) == 1
    assert "drafter 'org/nope' is not a local path, is not in the local Hugging Face cache" in capsys.readouterr().err
    assert calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    assert main(["generate", "--target", "org/typo", "-q", "hi"]) == 1
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "target 'org/typo'" in err and "hub is unreachable (offline: http://127.0.0.1:9 unreachable" in err
    assert calls == []
    assert main(["generate", "--target", "not a/valid/name", "-q", "hi"]) == 1
    assert "not a hub id" in capsys.readouterr().err
    snapshot = hub / "hub" / "models--org--cached" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    models.check_model_name("org/cached", "target")  # in the cache: no error, no network


# -- specdec chat ----------------------------------------------------------------------------------------

def _tiny_chat_model(path):
    from _tiny_models import chat_tokenizer, tiny_model

    tiny_model("llama", seed=0, layers=2).save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return str(path)


def test_chat_reads_lines_from_a_pipe(tmp_path):
    """printf '...' | specdec chat -q: one answer per message line, /reset and /exit, exit 0; the
    answers are the Python API's (ChatSession) for the same conversation."""
    from specdec.chat import ChatSession
    from specdec.generator import SpeculativeGenerator

    model = _tiny_chat_model(tmp_path / "m")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "specdec", "chat", "-q", "--target", model, "-n", "6", "--system", "w9"],
        input="w1 w2 w3\n\n/reset\nw1 w2 w3\nw4 w5\n/exit\nw6\n", cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # -q; and no prompt marker off a terminal
    gen = SpeculativeGenerator.from_pretrained(model, quantization="none", device="cpu")
    session = ChatSession(gen, system="w9", max_new_tokens=6)
    first = session.send("w1 w2 w3")
    session.reset()
    expected = [first, session.send("w1 w2 w3"), session.send("w4 w5")]
    assert proc.stdout.split("\n") == expected + [""]


def test_chat_ctrl_c_stops_the_answer_not_the_program(tmp_path, monkeypatch, capsys):
    import io

    import specdec.cli as cli

    model = _tiny_chat_model(tmp_path / "m")
    monkeypatch.setattr(sys, "stdin", io.StringIO("w1 w2\nw3 w4\n"))
    seen = []
    printer = cli._Printer.__call__

    def interrupt_first_answer(self, chunk):
        seen.append(chunk)
        if len(seen) == 1:
            raise KeyboardInterrupt
        printer(self, chunk)

    monkeypatch.setattr(cli._Printer, "__call__", interrupt_first_answer)
    assert main(["chat", "--target", model, "-n", "4"]) == 0
    out, err = capsys.readouterr()
    assert "answer interrupted" in err and "from the kept cache" in err
    assert out.count("\n") == 2 and ">>>" not in out


@pytest.mark.parametrize("flags, narrow", [([], True), (["--no-narrow-linear"], False)])
def test_narrow_linear_flag_reaches_the_generator(flags, narrow, monkeypatch):
    from specdec.generator import SpeculativeGenerator

    seen = {}

    def fake(cls, *a, **kw):
        seen.update(kw)
        raise KeyboardInterrupt  # stop before any model is loaded

    monkeypatch.setattr(SpeculativeGenerator, "from_pretrained", classmethod(fake))
    assert main(["generate", "--quiet", "--device", "cpu", *flags, "hi"]) != 0  # "interrupted"
    assert seen["narrow_linear"] is narrow


def test_generate_json_schema_on_embedded_default(tmp_path, capsys):
    """--json-schema FILE on SmolLM2: the output parses and validates (jsonschema); --json still
    prints the results as JSON."""
    pytest.importorskip("gguf")
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    argv = ["generate", "-q", "--json", "--json-schema", str(path), "-n", "40",
            "Paris has 2102650 inhabitants. Give the city and its population as JSON."]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reasons"] == ["eos"], out
    jsonschema.validate(json.loads(out["texts"][0]), schema)

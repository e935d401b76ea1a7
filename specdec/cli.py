"""Command line: ``specdec generate``, ``specdec chat`` and ``specdec bench`` (console script and
``python -m specdec``).

    specdec generate "Repeat this text: the quick brown fox"         # embedded SmolLM2 + n-gram drafter
    specdec generate --file prompts.txt --batch-size 8 --temperature 0.7 --seed 1
    specdec generate --target org/big --drafter org/small --int8 "prompt"
    specdec chat --system "You are terse." --show-acceptance          # multi-turn; KV cache kept across turns
    printf 'hi\\nwho are you\\n' | specdec chat -q                  # one message per line, exits at EOF
    specdec bench e2e -- --quick                                      # runs benchmarks/bench_e2e.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

BENCHMARKS = ("verify", "verify_tree", "sample", "cache", "linear", "e2e")
_GREEN, _RED, _RESET = "\033[32m", "\033[31m", "\033[0m"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_model_options(p) -> None:
    """Target, drafter, quantization and device: shared by ``generate`` and ``chat``."""
    p.add_argument("--target", "-m", default=None,
                   help="target model: hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--drafter", "-d", default="ngram",
                   help="'ngram' (prompt lookup, default), 'early-exit', 'none', or a drafter model name/path")
    p.add_argument("--early-exit-layers", type=int, default=None, help="layers of the early-exit drafter")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int8", dest="quantization", action="store_const", const="int8",
                       help="load models in int8 (bitsandbytes) on any device")
    quant.add_argument("--no-int8", dest="quantization", action="store_const", const="none",
                       help="never quantize")
    p.set_defaults(quantization="auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--num-draft-tokens", "-k", type=int, default=None,
                   help="K, the most drafts per row and step (default for n-gram 32 adaptive, 10 with --no-adaptive; 4 for model drafters)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="draft K tokens every step instead of choosing the width per step from the measured "
                        "forward cost and acceptance")
    p.add_argument("--no-tree", action="store_true",
                   help="verify a chain of drafts per step instead of a tree (n-gram and model drafters draft "
                        "trees by default)")
    p.add_argument("--no-narrow-linear", action="store_true",
                   help="run the CPU target's linear layers on torch's sgemm instead of specdec's kernel for "
                        "the few tokens of a verification forward (specdec.linear)")
    p.add_argument("--tree-nodes", type=int, default=None, help="node budget of a draft tree (default 2K, 4..64)")


def _add_sampling_options(p, *, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens,
                   help=f"the most new tokens per prompt or answer (default {max_new_tokens})")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)


def _add_output_options(p) -> None:
    p.add_argument("--show-acceptance", action="store_true",
                   help="colour accepted drafts green and resampled tokens red (on a terminal)")
    p.add_argument("--quiet", "-q", action="store_true", help="no stats or progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Exact speculative decoding with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with speculative decoding",
                         description="Generate with a target model verified by specdec's fused op. Without "
                                     "--target the embedded SmolLM2-135M-Instruct runs offline.")
    gen.add_argument("prompt", nargs="*", help="prompt text (several prompts form a batch)")
    gen.add_argument("--file", "-f", help="file of prompts, one per line ('-' = stdin)")
    _add_model_options(gen)
    _add_sampling_options(gen, max_new_tokens=128)
    gen.add_argument("--batch-size", "-b", type=int, default=None, help="prompts per batch (default: all)")
    gen.add_argument("--raw", action="store_true", help="do not wrap prompts in the model's chat template")
    _add_output_options(gen)
    gen.add_argument("--json", action="store_true", help="print results and stats as JSON")
    gen.add_argument("--verify-method", choices=("token", "block"), default="token",
                     help="chain verification: token by token (default) or block (Sun et al. 2025; differs only "
                          "with a sampled model or early-exit drafter; trees use tree verification)")
    gen.add_argument("--logprobs", action="store_true",
                     help="each generated token's log-probability (processed and raw): in the JSON with --json, "
                          "else each row's total and mean on stderr")
    structured = gen.add_argument_group("structured output (xgrammar; one grammar for every prompt)")
    one = structured.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="FILE|TEXT", help="JSON schema the output must satisfy (a file or the "
                     "schema text)")
    one.add_argument("--any-json", action="store_true", help="the output is any JSON value (--json, which prints "
                     "the results as JSON, is a different option)")
    one.add_argument("--regex", metavar="PATTERN", help="regular expression the whole output must match")
    one.add_argument("--grammar", metavar="FILE", help="EBNF grammar (xgrammar's GBNF, root rule 'root') in a file")
    structured.add_argument("--no-grammar-drafts", action="store_true",
                            help="do not draft the tokens the grammar forces")

    chat = sub.add_parser("chat", help="multi-turn chat on stdin, answers streamed",
                          description="Chat with the target model, speculative decoding every answer. Reads one "
                                      "message per line from stdin (a terminal or a pipe); /reset clears the "
                                      "conversation, /exit or end of input quits, Ctrl-C stops an answer. The "
                                      "target's KV cache is kept across turns: each turn prefills only its new "
                                      "tokens.")
    chat.add_argument("--system", default=None, help="system message (default: the chat template's own, if any)")
    _add_model_options(chat)
    _add_sampling_options(chat, max_new_tokens=256)
    _add_output_options(chat)

    bench = sub.add_parser("bench", help="run the benchmarks in benchmarks/",
                           description="Run benchmarks/bench_<name>.py main(argv) for each name; "
                                       "arguments after '--' are passed to every benchmark.")
    bench.add_argument("names", nargs="*", default=list(BENCHMARKS), help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    bench.add_argument("--benchmarks-dir", default=None, help="directory holding bench_*.py (default: the checkout's)")
    bench.add_argument("--out", default=None,
                       help="where CSVs and plots go (default: $SPECDEC_CACHE/bench, outside the source tree)")
    parser.subcommands = {"generate": gen, "chat": chat, "bench": bench}  # errors print the subcommand's usage
    return parser


def _validate(args, parser) -> None:
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or args.temperature == float("inf"):  # NaN fails >= too
        parser.error(f"--temperature must be finite and >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_draft_tokens is not None and not 0 <= args.num_draft_tokens <= 32:
        parser.error(f"--num-draft-tokens must be in 0..32, got {args.num_draft_tokens}")
    if args.early_exit_layers is not None and args.early_exit_layers < 1:
        parser.error(f"--early-exit-layers must be >= 1, got {args.early_exit_layers}")


def _read_prompts(args, parser) -> list:
    prompts = list(args.prompt)
    if args.file:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(args.file).read_text(encoding="utf-8")
            except OSError as error:
                parser.error(f"cannot read --file {args.file}: {error.strerror or error}")
            except UnicodeDecodeError as error:
                parser.error(f"cannot read --file {args.file}: not UTF-8 text ({error.reason} at byte {error.start})")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        parser.error("give a prompt or --file")
    return prompts


def _encode(tokenizer, prompts, raw: bool) -> list:
    from specdec.generator import encode_prompt  # the Python API's rule: chat template unless raw

    return [encode_prompt(tokenizer, p, False if raw else None) for p in prompts]


class _Printer:
    """Streams the single row's text as chunks arrive; colours drafts when asked."""

    def __init__(self, tokenizer, colour: bool):
        self.tokenizer, self.colour = tokenizer, colour
        self.ids, self.text = [], ""

    def _piece(self, new_ids) -> str:
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.text = text[len(self.text):], text
        return piece

    def __call__(self, chunk) -> None:
        if not self.colour:
            out = self._piece(chunk.token_ids)
        else:
            n = chunk.num_accepted
            out = _GREEN + self._piece(chunk.token_ids[:n]) + _RESET if n else ""
            last = chunk.token_ids[n:]
            if last:
                resampled = not chunk.is_bonus  # the target rejected a draft here
                piece = self._piece(last)
                out += (_RED + piece + _RESET) if resampled else piece
        sys.stdout.write(out)
        sys.stdout.flush()


def _grammar(args, parser):
    """The Grammar of --json-schema / --any-json / --regex / --grammar, or None."""
    from specdec.generator.grammar import Grammar

    def read(path, flag):
        try:
            return Path(path).read_text()
        except OSError as e:
            parser.error(f"{flag} {path}: {e.strerror or e}")

    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{") and Path(text).is_file():
            text = read(text, "--json-schema")
        try:
            return Grammar.json_schema(text)
        except ValueError as e:
            parser.error(f"--json-schema: {e} (pass a file or the schema's JSON text)")
    if args.any_json:
        return Grammar.json()
    if args.regex is not None:
        return Grammar.regex(args.regex)
    if args.grammar is not None:
        return Grammar.ebnf(read(args.grammar, "--grammar"))
    return None


def _load_generator(args, parser):
    """Device, quantization and models from the shared options; names are checked before any load."""
    import torch

    from specdec.drafters import DRAFTER_NAMES
    from specdec.generator import SpeculativeGenerator
    from specdec.models import default_device, resolve_quantization

    try:
        device = torch.device(args.device) if args.device else default_device()
    except (RuntimeError, ValueError):
        parser.error(f"--device {args.device}: not a device name (cpu, cuda, cuda:1, ...)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: specdec generates on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    quant = resolve_quantization(args.quantization, device)
    if args.quiet:  # no "Loading weights" bars or transformers' info lines either
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if not args.quiet:
        why = {"auto": f"auto on {device.type}" + ("" if device.type == "cuda" else
                                                   ": bitsandbytes int8 is slower than fp32 on CPU, --int8 forces it"),
               "int8": "--int8", "none": "--no-int8"}[args.quantization]
        _log(f"specdec: quantization {quant} ({why}); device {device}")
        _log(f"specdec: loading target {args.target or 'SmolLM2-135M-Instruct (embedded)'} ...")
    named_drafter = args.drafter.lower().replace("_", "-") not in DRAFTER_NAMES
    if named_drafter and not args.quiet:
        _log(f"specdec: loading drafter {args.drafter} ...")
    return SpeculativeGenerator.from_pretrained(args.target, args.drafter, quantization=quant, device=device,
                                                num_draft_tokens=args.num_draft_tokens, adaptive=not args.no_adaptive,
                                                early_exit_layers=args.early_exit_layers,
                                                tree=False if args.no_tree else None, max_tree_nodes=args.tree_nodes,
                                                narrow_linear=not args.no_narrow_linear)


def cmd_generate(args, parser) -> int:
    _validate(args, parser)
    prompts = _read_prompts(args, parser)
    grammar = _grammar(args, parser)
    gen = _load_generator(args, parser)
    tokenizer = gen.tokenizer
    ids = _encode(tokenizer, prompts, args.raw)
    stream = len(prompts) == 1 and not args.json
    colour = args.show_acceptance and sys.stdout.isatty()
    if args.show_acceptance and not colour and not args.quiet:
        _log("specdec: --show-acceptance colours only on a terminal; stdout is not one")
    callback = _Printer(tokenizer, colour) if stream else None
    progress = not stream and not args.quiet and sys.stderr.isatty()
    result = gen.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, callback=callback,
                          progress=progress, logprobs=args.logprobs, verify_method=args.verify_method,
                          grammar=grammar, grammar_drafts=not args.no_grammar_drafts)
    if args.json:
        out = {"prompts": prompts, "texts": result.texts, "token_ids": result.sequences,
               "finish_reasons": result.finish_reasons, "stats": result.stats.as_dict()}
        if args.logprobs:  # -inf (a token outside top-k/top-p cannot be emitted, but be safe) as null
            out["logprobs"] = [[_finite(x) for x in row] for row in result.logprobs]
            out["raw_logprobs"] = [[_finite(x) for x in row] for row in result.raw_logprobs]
        print(json.dumps(out, indent=2))
    elif stream:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(prompts, result.texts)):
            print(f"=== [{i}] {prompt}\n{text}\n")
    if args.logprobs and not args.json:
        for i, row in enumerate(result.logprobs):
            total = sum(row)
            _log(f"specdec: [{i}] logprob {total:.3f} over {len(row)} tokens (mean {total / max(len(row), 1):.3f})")
    if not args.quiet:
        _log(f"specdec: {result.stats.summary()}")
    return 0


def _finite(x: float):
    return round(x, 6) if math.isfinite(x) else None


CHAT_HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def _read_message(tty: bool):
    """The next non-empty line of stdin (None at end of input); on a terminal after a prompt marker."""
    while True:
        if tty:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return None
            except KeyboardInterrupt:  # at the prompt: a fresh line, as in Python's REPL
                print()
                _log(f"specdec: {CHAT_HELP}")
                continue
        else:
            line = sys.stdin.readline()
            if not line:
                return None
        line = line.strip()
        if line:
            return line


def cmd_chat(args, parser) -> int:
    _validate(args, parser)
    gen = _load_generator(args, parser)
    from specdec.chat import ChatSession

    tokenizer = gen.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template: chat needs an instruct model "
                         "(use 'specdec generate --raw' for plain completion)")
    session = ChatSession(gen, system=args.system, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:  # pragma: no cover
            pass
    colour = args.show_acceptance and sys.stdout.isatty()
    if args.show_acceptance and not colour and not args.quiet:
        _log("specdec: --show-acceptance colours only on a terminal; stdout is not one")
    if tty and not args.quiet:
        _log(f"specdec chat: {CHAT_HELP}")
    while True:
        message = _read_message(tty)
        if message is None or message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            session.reset()
            if not args.quiet:
                _log("specdec: conversation cleared")
            continue
        if message == "/help":
            _log(f"specdec: {CHAT_HELP}")
            continue
        try:
            session.send(message, callback=_Printer(tokenizer, colour))
        except KeyboardInterrupt:  # stops this answer only; what was printed stays in the conversation
            print(flush=True)
            _log("specdec: answer interrupted")
            continue
        print(flush=True)
        if not args.quiet:
            st = session.last_result.stats
            _log(f"specdec: {st.generated_tokens} tokens, {st.tokens_per_second:.1f} tokens/s, acceptance "
                 f"{st.acceptance_rate:.0%} ({st.accepted_tokens}/{st.drafted_tokens}), "
                 f"{st.tokens_per_step:.2f} tokens per target step; prefilled {session.last_prefilled} new "
                 f"tokens, {session.last_reused} from the kept cache")


def _benchmarks_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args, parser) -> int:
    extra = list(args.bench_args)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    folder = _benchmarks_dir(args.benchmarks_dir)
    if "--out" not in extra:  # never write into the package or checkout unless asked to
        from specdec.models import cache_dir

        out = Path(args.out) if args.out else cache_dir() / "bench"
        out.mkdir(parents=True, exist_ok=True)
        extra += ["--out", str(out)]
        _log(f"specdec: results go to {out}")
    for name in names:
        path = folder / f"bench_{name}.py"
        if not path.is_file():
            _log(f"specdec: error: benchmark script {path} not found (benchmarks ship with the source "
                 "checkout, not the installed package; pass --benchmarks-dir)")
            return 1
    for name in names:
        path = folder / f"bench_{name}.py"
        _log(f"specdec: running {path.name} {' '.join(extra)}")
        spec = importlib.util.spec_from_file_location(f"specdec_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(folder))  # benchmarks may import their shared helpers
        try:
            spec.loader.exec_module(module)
            if not hasattr(module, "main"):
                _log(f"specdec: error: {path} has no main(argv)")
                return 1
            status = module.main(extra)
        finally:
            sys.path.remove(str(folder))
        if status not in (None, 0):
            return int(status)
    return 0


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 ok, 1 runtime error, 2 usage error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = []
    if argv and argv[0] == "bench" and "--" in argv:  # everything after '--' goes to the benchmarks
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.bench_args = bench_args
    from specdec.models import IncompatibleModelsError, ModelLoadError

    try:
        if args.command == "generate":
            return cmd_generate(args, parser.subcommands["generate"])
        if args.command == "chat":
            return cmd_chat(args, parser.subcommands["chat"])
        return cmd_bench(args, parser.subcommands["bench"])
    except (ModelLoadError, IncompatibleModelsError) as error:
        _log(f"specdec: error: {error}")
        return 1
    except KeyboardInterrupt:
        _log("specdec: interrupted")
        return 130
    except (ValueError, TypeError, OSError) as error:  # bad arguments or files: one line, not a traceback
        if os.environ.get("SPECDEC_DEBUG") == "1":
            raise
        _log(f"specdec {args.command}: error: {error}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`looprl train | eval | export | serve | envs | config`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        # Known user errors: one line naming the offending thing, no traceback.
        print(f"looprl: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looprl", description="Train LLM agents with RL in tool-use environments.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run a recipe: looprl train CONFIG [key=value ...]",
                       epilog=_recipes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. algorithm.clip_eps=0.2")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace what the run folder holds (deletes it first)")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate runs, checkpoints or models; one table with CIs and pass@k",
                       description="Evaluate each TARGET: a run folder (its final checkpoint) or a checkpoint folder "
                                   "as the run evaluated itself (its env, kwargs, episodes, limits and temperatures "
                                   "from its config, unless given here), or a model with --env. Each episode samples "
                                   "from its own seeded stream: outcomes do not depend on batch size or --episodes.")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="run or checkpoint folders, models (with --env), and env kwargs as key=value "
                        "(e.g. difficulty=1), which override the run's")
    p.add_argument("--model", help="one more target (looprl/tiny, HF model id or folder, run or checkpoint)")
    p.add_argument("--env", action="append",
                   help="environment id, e.g. looprl/Calc-v0 (default: the run's); repeat it to evaluate every "
                        "target on each environment (one table row per target, environment and mode)")
    p.add_argument("--episodes", type=int,
                   help="held-out tasks, seeds 0..N-1 (default: the run's eval.episodes, or 100); a finite dataset "
                        "plays each of its rows once, at most this many (a model's default: every row)")
    p.add_argument("--split", help="task split (default: the run's eval kwargs, or test)")
    p.add_argument("--temperature", type=float,
                   help="one mode at this temperature, 0: greedy (default: the run's sampled and greedy modes, or 1)")
    p.add_argument("--max-new-tokens", type=int, help="the most tokens in one turn (default: the run's, or 64)")
    p.add_argument("--max-tokens", type=int, help="the most tokens in one episode (default: the run's, or 1024)")
    p.add_argument("--pass-k", default="1", help="comma-separated k for pass@k and pass^k, e.g. 1,4")
    p.add_argument("--samples", type=int,
                   help="sampled episodes per task (default: the largest --pass-k); greedy modes play one")
    p.add_argument("--max-batch-size", type=int, help="hf engine: rows per decode (default: the run's, or 64)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--engine", choices=("hf", "vllm", "openai"), default="hf",
                   help="hf: transformers in-process; vllm (GPU, the vllm extra); openai: a server at --openai-url")
    p.add_argument("--openai-url", help="--engine openai: the server's API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", help="--engine openai: the model id the server serves (default: --model)")
    p.add_argument("--out", help="JSON report path, when one report is written (default: RUN/eval/, or next to "
                                 "the model)")
    p.add_argument("--baseline", help="an earlier report on the same tasks (a looprl eval JSON or a run's "
                                      "eval/*.jsonl): print the paired change from it")
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a transformers model folder (LoRA merged) or a LoRA adapter")
    p.add_argument("source", help="run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs: write the PEFT adapter (adapter_config.json, adapter_model.safetensors) and "
                        "the tokenizer, for PeftModel.from_pretrained(base, OUT), not merged weights")
    p.set_defaults(func=_export)

    p = sub.add_parser("report", help="write a run's HTML report: curves, evaluation, config, trajectories")
    p.add_argument("run", help="run folder (holds config.yaml and metrics.jsonl)")
    p.add_argument("--out", help="output folder (default: RUN/report)")
    p.set_defaults(func=_report)

    p = sub.add_parser("config", help="show a resolved recipe: config show RECIPE [key=value ...]")
    configs = p.add_subparsers(required=True, metavar="ACTION")
    c = configs.add_parser("show", help="print every field's value, default and help, by section")
    c.add_argument("config", help="YAML recipe (see configs/)")
    c.add_argument("overrides", nargs="*", help="key.path=value overrides, as `looprl train` takes them")
    c.add_argument("--yaml", action="store_true",
                   help="print a YAML recipe instead, each field's help a comment (it loads as it is)")
    c.set_defaults(func=_config_show)

    p = sub.add_parser("serve", help="serve a model over the OpenAI chat-completions API")
    p.add_argument("model", help="looprl/tiny, HF model id or folder, run folder or checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch-size", type=int, default=64, help="the most sequences in one generate call")
    p.add_argument("--served-model-name", help="the `model` id clients pass (default: MODEL as given)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-queue", type=int, default=256,
                   help="the most sampling requests admitted at once, in flight or waiting; more get 429 at once")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body in bytes (413)")
    p.add_argument("--max-n", type=int, default=64, help="the most choices per prompt (n)")
    p.add_argument("--max-prompts", type=int, default=64, help="the most prompts in one /v1/completions request")
    p.add_argument("--min-temperature", type=float, default=0.01,
                   help="the lowest positive temperature served; lower gets 400 (use 0 for greedy)")
    p.add_argument("--accept-weights", action="store_true",
                   help="load weights a training run publishes (POST /v1/looprl/weights with a file path on this "
                        "machine): only on a trusted address")
    p.set_defaults(func=_serve)

    p = sub.add_parser("envs", help="list environments; `envs check ID`, `envs play ID`")
    p.set_defaults(func=_envs)
    envs = p.add_subparsers(metavar="ACTION")
    c = envs.add_parser("check", help="check an environment against the looprl contract")
    c.add_argument("env_id", help="environment id, e.g. looprl/Calc-v0")
    c.add_argument("kwargs", nargs="*", help="env kwargs as key=value (e.g. split=test)")
    c.add_argument("--episodes", type=int, default=100, help="oracle episodes")
    c.add_argument("--hostile", type=int, default=1000, help="malformed/hostile actions to send")
    c.set_defaults(func=_envs_check)
    c = envs.add_parser("play", help="play an environment in the terminal, as the agent")
    c.add_argument("env_id", help="environment id, e.g. looprl/Calc-v0")
    c.add_argument("kwargs", nargs="*", help="env kwargs as key=value (e.g. split=test)")
    c.add_argument("--seed", type=int, default=0, help="task seed")
    c.set_defaults(func=_envs_play)
    return parser


def _recipes_epilog() -> str:
    from looprl.config import describe_algorithms
    from looprl.train.recipes import RECIPES

    algorithms = "\n".join(f"  {name:12} {text}" for name, text in describe_algorithms().items())
    recipes = "\n".join(f"  {e.name:12} {e.description}" for e in RECIPES.values())
    return f"algorithms (algorithm.name=...):\n{algorithms}\n\nrecipes (chosen by the config):\n{recipes}"


def _train(args) -> int:
    from looprl.config import load_config
    from looprl.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    results = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary: rank 0's
        _print_results(results)
        console.print(f"run folder: {cfg.run_dir}")
    return 0


def _print_results(results: dict) -> None:
    from looprl.train.evaluate import describe_change

    table = Table(title="held-out success")
    table.add_column("policy")
    table.add_column("sampled")
    table.add_column("greedy")
    for tag, label in (("warmstart", "warm-start (SFT)"), ("final", "after RL")):
        res = results.get(tag) or {}
        cells = [f"{res[m]['success_rate']:.1%} ± {res[m]['success_stderr']:.1%}" if m in res else "-"
                 for m in ("sampled", "greedy")]
        table.add_row(label, *cells)
    if change := results.get("change"):
        table.add_row("change (paired)", *(describe_change(change[m]) if m in change else "-"
                                           for m in ("sampled", "greedy")))
    console.print(table)


def _eval(args) -> int:
    import torch

    from looprl.train.eval_targets import resolve_target
    from looprl.train.metrics import write_text_atomic

    for flag, value in (("--episodes", args.episodes), ("--max-new-tokens", args.max_new_tokens),
                        ("--max-tokens", args.max_tokens), ("--threads", args.threads), ("--samples", args.samples),
                        ("--max-batch-size", args.max_batch_size)):
        if value is not None and value <= 0:
            raise ValueError(f"Expect {flag} to be positive, actually: {value}")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"Expect --temperature to be >= 0 (0: greedy), actually: {args.temperature}")
    ks = _pass_k(args.pass_k)
    samples = args.samples or max(ks)
    if samples < max(ks):
        raise ValueError(f"Expect --samples >= the largest --pass-k ({max(ks)}), actually: {samples}")
    sources = [t for t in args.targets if "=" not in t] + ([args.model] if args.model else [])
    if not sources:
        raise ValueError("Expect something to evaluate: looprl eval RUN_OR_CHECKPOINT..., or --model M --env E")
    if args.engine != "hf" and len(sources) > 1:
        raise ValueError(f"--engine {args.engine} evaluates one model, actually {len(sources)} targets")
    envs = args.env or [None]
    if len(set(envs)) != len(envs):
        raise ValueError(f"Expect each --env once, actually: {', '.join(args.env)}")
    options = {"episodes": args.episodes, "max_new_tokens": args.max_new_tokens,
               "max_tokens": args.max_tokens, "temperature": args.temperature, "split": args.split,
               "max_batch_size": args.max_batch_size}
    env_kwargs = _env_kwargs([t for t in args.targets if "=" in t])
    by_source = [[resolve_target(source, {**options, "env": env}, env_kwargs) for env in envs] for source in sources]
    targets = [t for of_source in by_source for t in of_source]
    reports = [(t, mode) for t in targets for mode in t.modes]
    if args.out and len(reports) > 1:
        raise ValueError(f"--out names one report, but {len(reports)} would be written (targets x modes): drop it "
                         "(they go to each run's eval/) or evaluate one target with --temperature")
    if args.baseline and any(len(t.modes) > 1 for t in targets):
        raise ValueError("--baseline pairs with one mode per target: give --temperature (the run evaluates "
                         "sampled and greedy)")
    baseline = _read_baseline(args.baseline, targets) if args.baseline else None
    torch.set_num_threads(args.threads)
    for target in targets:
        if target.rows is not None:
            s = target.settings
            console.print(f"{target.label}: {s['env_id']} {s['env_kwargs']} is a dataset of {target.rows} rows: "
                          f"playing {s['episodes']} of them, each once", soft_wrap=True)
    rows = []
    for of_source in by_source:
        engine, tokenizer = _eval_engine(args, of_source[0])  # one policy, loaded once for all its environments
        for target in of_source:
            for mode in target.modes:
                report = _evaluate_mode(engine, tokenizer, target, mode, ks, samples, baseline)
                out = Path(args.out) if args.out else target.report_path(mode)
                write_text_atomic(out, json.dumps(report, indent=2))  # it may be another run's --baseline
                rows.append((target.label, mode, report, out))
    (console if console.is_terminal else Console(width=320)).print(_eval_table(rows, ks))  # piped: not cut at 80
    for _, _, _, out in rows:
        console.print(f"report: {out}", soft_wrap=True)  # a path stays whole, to copy
    return 0


def _pass_k(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise ValueError(f"Expect --pass-k to be comma-separated positive integers, e.g. 1,4, actually: {text!r}") from None
    if ks[0] < 1:
        raise ValueError(f"Expect --pass-k to be comma-separated positive integers, e.g. 1,4, actually: {text!r}")
    return ks


def _evaluate_mode(engine, tokenizer, target, mode: str, ks: list[int], samples: int, baseline) -> dict:
    """One mode's report: the summary, success's Wilson interval, pass@k and pass^k, the records."""
    from looprl.train.eval_stats import compare_summary
    from looprl.train.evaluate import evaluate_episodes, paired_change, summarize

    temperature = target.modes[mode]
    n = 1 if temperature == 0 else samples  # greedy decoding samples the same episode every time
    records, lost = evaluate_episodes(engine, tokenizer, **target.settings, temperature=temperature, samples=n)
    stats = compare_summary(records, [k for k in ks if k <= n])
    if n == 1:  # one deterministic sample: every k of them succeed or fail together
        stats["pass_at_k"] = stats["pass_hat_k"] = {k: stats["success_rate"] for k in ks}
    change = paired_change(baseline["records"], records) if baseline else None
    s = target.settings
    return {"model": target.source, "checkpoint": str(target.checkpoint) if target.checkpoint else None,
            "env": s["env_id"], "split": s["env_kwargs"].get("split"), "env_kwargs": s["env_kwargs"],
            "mode": mode, "temperature": temperature, "max_new_tokens": s["max_new_tokens"],
            "max_tokens": s["max_tokens"], **summarize(records, lost=len(lost)), **stats,
            **({"baseline": baseline["path"], "change": change} if change else {}), "records": records, "lost": lost}


def _eval_table(rows, ks: list[int]) -> Table:
    from looprl.train.evaluate import describe_change

    table = Table(title="held-out evaluation (success: 95% Wilson interval; pass@k: unbiased estimator)")
    for column in ("target", "env", "mode", "tasks x samples", "success [95% CI]", *(f"pass@{k}" for k in ks),
                   *(f"pass^{k}" for k in ks), "return", "turns", "tokens", "tool errors", "lost"):
        table.add_column(column)
    changes = any("change" in r for _, _, r, _ in rows)
    if changes:
        table.add_column("change from baseline")
    for label, mode, r, _ in rows:
        low, high = r["success_ci95"]
        cells = [label, r["env"] + (f" ({r['split']})" if r["split"] else ""), f"{mode} (T={r['temperature']:g})",
                 f"{r['tasks']} x {r['samples']}", f"{r['success_rate']:.1%} [{low:.1%}, {high:.1%}]",
                 *(f"{r['pass_at_k'][k]:.1%}" for k in ks), *(f"{r['pass_hat_k'][k]:.1%}" for k in ks),
                 f"{r['mean_return']:.3g}", f"{r['mean_turns']:.2f}", f"{r['mean_tokens']:.1f}",
                 f"{r['tool_error_rate']:.1%}", str(r["lost_episodes"])]
        table.add_row(*cells, *([describe_change(r["change"]) if "change" in r else "-"] if changes else []))
    return table


def _eval_engine(args, target):
    """The engine `--engine` names over `target`'s policy, and its tokenizer."""
    if args.engine == "hf":
        from looprl.rollout.engine import HFEngine

        model, tokenizer, _ = _load_for_eval(target.source)
        return HFEngine(model, tokenizer, **target.engine), tokenizer
    from looprl.train.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(target.source)  # the tokenizer renders the turns; the weights are the server's
    tokenizer = load_tokenizer(path)
    if args.engine == "openai":
        from looprl.rollout.openai_engine import OpenAIEngine

        if not args.openai_url:
            raise ValueError("--engine openai samples from a server: give --openai-url (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIEngine(args.openai_url, args.served_model or target.source), tokenizer
    from looprl.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(path), tokenizer


def _read_baseline(path: str, targets) -> dict:
    """An earlier report on the same tasks as every target: a `looprl eval` JSON report (same
    environment, kwargs and episodes) or a run's own `eval/*.jsonl` records."""
    from looprl.train.metrics import read_jsonl

    try:
        report = {"records": read_jsonl(path)} if path.endswith(".jsonl") else json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--baseline {path}: cannot read a report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("records"), list):
        raise ValueError(f"--baseline {path}: not a looprl eval report with per-episode records")
    for target in targets:
        s = target.settings
        if "env" in report and (report.get("env"), report.get("env_kwargs")) != (s["env_id"], s["env_kwargs"]):
            raise ValueError(f"--baseline {path} evaluated {report.get('env')} with {report.get('env_kwargs')}, not "
                             f"{s['env_id']} with {s['env_kwargs']}: its tasks differ")
        if len(report["records"]) != s["episodes"]:
            raise ValueError(f"--baseline {path} has {len(report['records'])} episodes, not --episodes "
                             f"{s['episodes']}: a paired change needs the same tasks")
    return {**report, "path": path}


def _load_for_eval(name: str):
    """A run or checkpoint folder loads through its checkpoint; anything else as a model."""
    from looprl.train.export import load_trained_policy
    from looprl.train.models import load_policy

    path = Path(name)
    if path.is_dir() and ((path / "manifest.json").exists() or (path / "checkpoints").is_dir()):
        model, tokenizer, _ = load_trained_policy(path)
        return model, tokenizer, path
    model, tokenizer, resolved = load_policy(name)
    return model, tokenizer, Path(resolved) if Path(resolved).is_dir() and path.exists() else None


def _serve(args) -> int:
    try:
        import uvicorn

        from looprl.rollout.server import app_for_model
    except ImportError as e:
        raise RuntimeError(f"looprl serve needs fastapi and uvicorn ({e}); install them with "
                           "pip install 'looprl[serve]'") from None
    import torch

    if args.max_batch_size <= 0:
        raise ValueError(f"Expect --max-batch-size to be positive, actually: {args.max_batch_size}")
    if not 0 < args.port < 65536:
        raise ValueError(f"Expect --port to be a TCP port, 1 to 65535, actually: {args.port}")
    if args.threads <= 0:
        raise ValueError(f"Expect --threads to be positive, actually: {args.threads}")
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = _load_for_eval(args.model)
    name = args.served_model_name or args.model
    app = app_for_model(model, tokenizer, name, max_batch_size=args.max_batch_size, accept_weights=args.accept_weights,
                        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                        max_prompts=args.max_prompts, min_temperature=args.min_temperature)
    console.print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API); Ctrl-C stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _export(args) -> int:
    from looprl.train.export import export

    out = export(args.source, args.out, adapter_only=args.adapter_only)
    console.print(f"exported {'the LoRA adapter' if args.adapter_only else 'the model'} to {out}")
    return 0


def _report(args) -> int:
    from looprl.report import write_report

    report = write_report(args.run, args.out)
    console.print(f"report: {report.page}" + (f" ({report.png_note})" if report.png_note else ""))
    return 0


def _config_show(args) -> int:
    from looprl.config import load_config
    from looprl.config_show import format_value, settings, yaml_with_help

    cfg = load_config(args.config, args.overrides)
    if args.yaml:
        header = (f"looprl config show {' '.join([args.config, *args.overrides])}\n"
                  "(a changed field's comment ends with its default)")
        print(yaml_with_help(cfg, header), end="")
        return 0
    for section in settings(cfg):
        table = Table(title=f"{section.name}: {section.help}", title_justify="left", expand=True)
        table.add_column("key", no_wrap=True)
        table.add_column("value", overflow="fold")
        table.add_column("default", style="dim", overflow="fold")
        table.add_column("help", ratio=1)
        for s in section.settings:
            value = Text(format_value(s.value), style="bold yellow" if s.changed else "")
            table.add_row(s.name, value, Text(format_value(s.default)), Text(s.help))  # Text: no markup
        console.print(table)
    console.print("values in yellow differ from their defaults; --yaml prints the config as a recipe", style="dim")
    return 0


def _envs(args) -> int:
    from looprl.envs import list_envs

    table = Table(title="looprl environments")
    for column in ("id", "description", "tools", "reward"):
        table.add_column(column)
    for env in list_envs():
        tools = "\n".join(f"{t['name']}: {t['description']}" for t in env["tools"])
        table.add_row(env["id"], env["description"], tools, env["reward"])
    console.print(table)
    return 0


def _env_kwargs(items: list[str]) -> dict:
    from looprl.config import ConfigError, apply_override

    kwargs: dict = {}
    for item in items:
        if "." in item.partition("=")[0]:
            raise ConfigError(f"Env kwarg {item!r} is not of the form key=value")
        apply_override(kwargs, item)
    return kwargs


def _envs_check(args) -> int:
    from looprl.envs.checker import check

    results = check(args.env_id, episodes=args.episodes, hostile=args.hostile, **_env_kwargs(args.kwargs))
    table = Table(title=f"looprl envs check {args.env_id}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, "[green]ok[/green]" if r.ok else "[red]FAIL[/red]", r.detail)
    console.print(table)
    return 0 if all(r.ok for r in results) else 1


def _envs_play(args) -> int:
    """Read the agent's raw turns from stdin; /oracle plays the expert's turn, /quit stops."""
    from looprl.envs import make_env

    env = make_env(args.env_id, **_env_kwargs(args.kwargs)).unwrapped
    obs, info = env.reset(seed=args.seed)
    for message in info["messages"]:
        console.print(Text.assemble((message["role"], "bold"), ": ", message["content"]))
    console.print(Text("tools:", style="bold"))
    for schema in info["tools"]:
        console.print(json.dumps(schema["function"]), markup=False, soft_wrap=True)
    console.print("Type the assistant's turn (tool calls as <tool_call>{...}</tool_call>); "
                  "/oracle plays the expert's turn, /quit stops.", style="dim")
    total, done = 0.0, False
    while not done:
        try:
            line = input("assistant> ")
        except EOFError:
            break
        if line.strip() == "/quit":
            break
        action = env.oracle_action() if line.strip() == "/oracle" else line
        if line.strip() == "/oracle":
            console.print(action, markup=False)
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        for message in info["messages"]:
            console.print(Text.assemble((message["role"], "bold"), f" ({message.get('name', '')}): ",
                                        message["content"]))
        done = terminated or truncated
    console.print(f"return {total:g}, success {bool(info.get('success'))}"
                  + (" (terminated)" if done and terminated else " (truncated)" if done else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
